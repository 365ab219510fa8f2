"""mergekit's YAML (``merge_method``, ``base_model``, ``models[].parameters``, ``parameters``, ``dtype``)
to and from our MergeConfig. ``merge_method: obim`` is our addition; a model may name its OBIM
calibration data with ``calibration: FILE`` (jsonl or text)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from merging.config import ExpertRef, MergeConfig
from merging.errors import MergeError

MERGEKIT_METHODS = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "della"}


@dataclass(frozen=True)
class FileMergePlan:
    config: MergeConfig
    dtype: str | None = None


def _unique_name(path: str, taken: set[str]) -> str:
    stem = Path(path.rstrip("/")).name or "model"
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    taken.add(name)
    return name


def parse_mergekit(text: str, relative_to: Path | None = None) -> FileMergePlan:
    """Parse mergekit YAML; relative model paths resolve against ``relative_to`` when it holds them."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergeError(f"config is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise MergeError("config must be a YAML mapping")
    unknown = sorted(set(doc) - {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source",
                                 "seed", "name"})
    if unknown:
        raise MergeError(f"config: unknown key(s) {unknown}")
    for key in ("merge_method", "models"):
        if key not in doc:
            raise MergeError(f"config: '{key}' is required")

    def resolve(p: str) -> str:
        if relative_to is not None and not Path(p).is_absolute() and (relative_to / p).exists():
            return str((relative_to / p).resolve())
        return str(p)

    method = doc["merge_method"]
    base = doc.get("base_model")
    models = doc["models"] or []
    taken: set[str] = set()
    experts = []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeError(f"config: models[{i}] needs a 'model'")
        path = resolve(str(entry["model"]))
        if base is not None and path == resolve(str(base)):
            continue  # mergekit lets the base appear among the models; it carries no delta
        calibration = resolve(str(entry["calibration"])) if entry.get("calibration") else None
        experts.append(ExpertRef(name=_unique_name(path, taken), path=path,
                                 params=dict(entry.get("parameters") or {}), calibration=calibration))
    if base is None:
        if method != "linear":
            raise MergeError(f"config: method '{method}' needs a 'base_model'")
        base = experts[0].path
    config = MergeConfig(method=method, base=resolve(str(base)), experts=tuple(experts),
                         params=dict(doc.get("parameters") or {}), seed=int(doc.get("seed", 0)))
    return FileMergePlan(config=config, dtype=doc.get("dtype"))


def to_mergekit(config: MergeConfig, dtype: str | None = None) -> str:
    """mergekit YAML for a config (OBIM is written as ``merge_method: obim``, which only mmmo reads)."""
    if config.grouping is not None:
        raise MergeError("per-layer-group / per-filter parameters have no mergekit form here; export the spec")
    doc: dict[str, Any] = {
        "merge_method": config.method,
        "base_model": config.base,
        "models": [{"model": e.path, "parameters": dict(e.params)} | ({"calibration": e.calibration} if e.calibration
                                                                       else {}) for e in config.experts],
    }
    if config.params:
        doc["parameters"] = dict(config.params)
    if dtype:
        doc["dtype"] = dtype
    return yaml.safe_dump(doc, sort_keys=False)
