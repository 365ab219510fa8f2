"""mergekit's YAML (``merge_method``, ``base_model``, ``models[].parameters``, ``parameters``, ``dtype``,
``tokenizer_source`` / ``tokenizer``) to and from our MergeConfig. ``merge_method: obim`` is our
addition; a model may name its OBIM calibration data with ``calibration: FILE`` (jsonl or text), and
the config a shared one at its top (read under OBIM's ``calibration: shared | both``).

A parameter is any of mergekit's settings (``merging.config.Setting``): a scalar, a gradient
(``[0.2, 0.9]``, interpolated over the layers) or ``filter`` entries. A config with searched layer
groups and filters is written with them: per filter, a per-layer gradient that mergekit's
interpolation turns back into each layer's value exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from merging.config import (
    ExpertRef,
    Grouping,
    MergeConfig,
    Scalar,
    Setting,
    TokenizerSetting,
    interpolate,
    layer_position,
    parse_settings,
)
from merging.errors import MergeError

DTYPE_NAMES = ("float32", "float16", "bfloat16")


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
    if "slices" in doc:  # layer stacking writes another architecture: its own planner
        raise MergeError("config: 'slices' (layer stacking) is merged by merging.slices (as `mmmo merge` does), "
                         "not as a merge of one architecture")
    unknown = sorted(set(doc) - {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                                 "tokenizer_source", "tokenizer", "seed", "name", "calibration"})
    if unknown:
        raise MergeError(f"config: unknown key(s) {unknown}")
    for key in ("merge_method", "models"):
        if key not in doc:
            raise MergeError(f"config: '{key}' is required")

    def resolve(p: str) -> str:
        if relative_to is not None and not Path(p).is_absolute() and (relative_to / p).exists():
            return str((relative_to / p).resolve())
        return str(p)

    from merging.methods import METHODS  # torch: not at import, the API server exports without it

    method = doc["merge_method"]
    traits = METHODS.get(method)  # an unknown method is refused, with the known ones, when the merge is planned
    needs_base = traits.needs_base if traits else True
    base_is_input = traits.base_is_input if traits else False
    base_optional = traits.base_optional if traits else False
    base_input = True
    base = doc.get("base_model")
    models = doc["models"] or []
    taken: set[str] = set()
    experts = []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeError(f"config: models[{i}] needs a 'model'")
        path = resolve(str(entry["model"]))
        if base is not None and path == resolve(str(base)) and not base_is_input:
            continue  # mergekit lets the base appear among the models; it carries no delta
        calibration = resolve(str(entry["calibration"])) if entry.get("calibration") else None
        params = _settings(entry.get("parameters") or {}, f"model '{entry['model']}'")
        experts.append(ExpertRef(name=_unique_name(path, taken), path=path, params=params, calibration=calibration))
    if base is None:
        if needs_base:
            raise MergeError(f"config: method '{method}' needs a 'base_model'")
        if not experts:
            raise MergeError("config: 'models' names no model")
        base = experts[0].path
        base_input = not base_optional  # the first model gives the layout; the method merges the models
    elif base_is_input and all(e.path != resolve(str(base)) for e in experts):
        # mergekit merges every model it reads, the base included after them (weighted by the global default)
        experts.append(ExpertRef(name=_unique_name(resolve(str(base)), taken), path=resolve(str(base))))
    for key in ("dtype", "out_dtype"):
        if doc.get(key) is not None and doc[key] not in DTYPE_NAMES:
            raise MergeError(f"config: '{key}' must be one of {list(DTYPE_NAMES)}, got {doc[key]!r}")
    tokenizer = TokenizerSetting.from_mergekit(doc.get("tokenizer_source"), doc.get("tokenizer"))
    # mergekit's `dtype` is what the inputs are read in (the merge config's own dtype); `out_dtype`
    # what is written, by default the same.
    config = MergeConfig(method=method, base=resolve(str(base)), experts=tuple(experts),
                         params=_settings(doc.get("parameters") or {}, "parameters"), seed=int(doc.get("seed", 0)),
                         dtype=doc.get("dtype"), base_input=base_input,
                         tokenizer=tokenizer.map_models(resolve).to_dict() if tokenizer is not None else None,
                         calibration=resolve(str(doc["calibration"])) if doc.get("calibration") else None)
    return FileMergePlan(config=config, dtype=doc.get("out_dtype"))


def _settings(raw: Any, where: str) -> dict[str, Any]:
    """Settings checked for their shape (the values are the method's to check), in canonical form."""
    return {name: setting.raw() for name, setting in parse_settings(raw, where).items()}


# ---- export: searched layer groups and filters as mergekit settings ----

LAYER_MARKER = "layers."  # in the name of every tensor that merging.config.LAYER places in a layer


def _same(a: Scalar | None, b: Scalar | None) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str) or a is None:
        return type(a) is type(b) and a == b
    return float(a) == float(b)


def _positions(n: int) -> list[float]:
    return [i / (n - 1) if n > 1 else 1.0 for i in range(n)]


def per_layer(values: Sequence[Scalar]) -> Scalar | list[Scalar]:
    """A setting giving layer ``i`` of ``len(values)`` exactly ``values[i]`` in mergekit: the value
    itself when all are equal, else a gradient. mergekit evaluates layer ``i`` at
    ``(i / (n - 1)) * (len - 1)``, which floating point leaves a hair off ``i`` for some layers
    (layer 15 of 80 comes out at 15.000000000000002), so a list of one value per layer would blend
    in a hair of the neighbouring layer's value wherever that neighbour differs. Then each value is
    listed three times (positions ``3i - 1 .. 3i + 1``), so that layer ``i`` lands between two equal
    entries, which interpolate to that value exactly. Checked here by evaluating mergekit's formula."""
    first = values[0]
    if all(_same(v, first) for v in values):
        return first
    n = len(values)
    for m in (1, 3):
        listed = tuple(values[(j + m // 2) // m] for j in range(m * (n - 1) + 1))
        if all(_same(interpolate(listed, t), v) for t, v in zip(_positions(n), values, strict=True)):
            return list(listed)
    raise MergeError(f"no gradient reproduces the per-layer values {list(values)} exactly")  # not expected


def _grouped_setting(values: dict[str, Scalar], grouping: Grouping) -> Setting:
    """Filter entries (and per-layer gradients) giving each tensor its group's value, as
    ``grouping.group_of`` assigns them, for every tensor outside the layers whose name contains no
    filter. A tensor outside the layers whose name contains a filter gets that filter's value at
    layer 0 (mergekit evaluates such tensors at position 0); :func:`_pin_names` fixes those."""
    parts = [*grouping.filters, "other"] if grouping.filters else ["all"]
    for f in grouping.filters:
        if f in ("", "*"):
            raise MergeError(f"the filter {f!r} means every tensor to mergekit; it has no mergekit form")
    if not grouping.layered:
        entries: list[tuple[str | None, Any]] = [(f, values[f"all/{f}"]) for f in grouping.filters]
        entries.append((None, values[f"all/{parts[-1]}"]))
    else:
        n = grouping.num_layers
        assert n is not None
        layer = [grouping.layer_part(i) for i in range(n)]

        def gradient(part: str) -> Scalar | tuple[Scalar, ...]:
            listed = per_layer([values[f"{g}/{part}"] for g in layer])
            return tuple(listed) if isinstance(listed, list) else listed

        entries = [(f, gradient(f)) for f in grouping.filters]
        inside, outside = gradient(parts[-1]), values[f"rest/{parts[-1]}"]
        if isinstance(inside, tuple) or not _same(inside, outside):
            entries.append((LAYER_MARKER, inside))
        entries.append((None, outside))
    setting = Setting(tuple(entries))
    if all(not isinstance(v, tuple) and _same(v, entries[-1][1]) for _, v in entries):
        return Setting(((None, entries[-1][1]),))
    return setting


def _pin_names(setting: Setting, values: dict[str, Scalar], grouping: Grouping, names: Iterable[str],
               where: str) -> Setting:
    """``setting``, with an entry per tensor it would get wrong (by the tensor's full name, longest
    names first so that none catches a longer one), checked against every tensor."""

    def wrong(s: Setting) -> list[str]:
        return [n for n in names
                if not _same(s.at(n, layer_position(n, grouping.num_layers)), values[grouping.group_of(n)])]

    missed = wrong(setting)
    if not missed:
        return setting
    pinned = tuple((n, values[grouping.group_of(n)]) for n in sorted(missed, key=lambda n: (-len(n), n)))
    fixed = Setting(pinned + setting.entries)
    still = wrong(fixed)
    if still:
        raise MergeError(f"{where}: no mergekit filters give tensor '{still[0]}' its group's value "
                         f"('{grouping.group_of(still[0])}'): its name is part of another tensor's")
    return fixed


def _needs_names(setting: Setting, values: dict[str, Scalar], grouping: Grouping) -> bool:
    """Whether a tensor outside the layers whose name contains a filter would get a wrong value."""
    if not (grouping.layered and grouping.filters):
        return False
    for f, value in setting.entries:
        if f in grouping.filters:
            at_zero = interpolate(value, 0.0) if isinstance(value, tuple) else value
            if not _same(at_zero, values[f"rest/{f}"]):
                return True
    return False


def _expert_settings(config: MergeConfig, expert: ExpertRef, names: Callable[[], list[str]] | None,
                     tensor_names: Callable[[], list[str]]) -> dict[str, Any]:
    grouping = config.grouping
    if grouping is None or not expert.group_params:
        return dict(expert.params)
    groups = grouping.groups()
    out: dict[str, Any] = {}
    keys = dict.fromkeys([*expert.params, *(k for g in groups for k in expert.group_params.get(g, {}))])
    for key in keys:
        where = f"model '{expert.name}': '{key}'"
        raw = {g: expert.params_for(g).get(key, config.params.get(key)) for g in groups}
        if all(v is None for v in raw.values()):
            continue
        if any(v is None for v in raw.values()):
            raise MergeError(f"{where} is set for some layer groups / filters and not for others, with no "
                             "global value: mergekit has no form for that")
        settings = {g: Setting.parse(v, key, f"model '{expert.name}'") for g, v in raw.items()}
        if not all(s.constant for s in settings.values()):
            if len({repr(s) for s in settings.values()}) == 1:  # the same gradient or entries everywhere
                out[key] = next(iter(settings.values())).raw()
                continue
            raise MergeError(f"{where}: a gradient or filtered value beside searched layer groups / filters "
                             "has no mergekit form")
        values = {g: s.entries[0][1] for g, s in settings.items()}
        setting = _grouped_setting(values, grouping)
        if names is not None or _needs_names(setting, values, grouping):
            setting = _pin_names(setting, values, grouping, names() if names is not None else tensor_names(),
                                 where)
        out[key] = setting.raw()
    return out


class _Dumper(yaml.SafeDumper):
    """Lists of numbers in flow style (``[0.2, 0.2, 0.9]``), as mergekit writes them."""


_Dumper.add_representer(list, lambda d, data: d.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=all(isinstance(v, (int, float, bool, str)) for v in data)))


def to_mergekit(config: MergeConfig, dtype: str | None = None, *, tensor_names: Iterable[str] | None = None) -> str:
    """mergekit YAML for a config (OBIM is written as ``merge_method: obim``, which only mmmo reads).

    Searched layer groups and filters become ``filter`` entries with per-layer gradients. mergekit
    evaluates tensors outside the layers (embeddings, final norm, lm_head) at layer 0's position, so
    where one of them contains a filter and its group's value differs from layer 0's, it gets an
    entry of its own, by name: from ``tensor_names``, else read from the base's checkpoint headers.

    Raises:
        MergeError: a config mergekit cannot express, or tensor names needed and the base unreadable.
    """
    given = list(tensor_names) if tensor_names is not None else None
    read: list[str] = []

    def base_names() -> list[str]:
        if not read:
            from merging.io import open_reference

            try:
                read.extend(open_reference(config.base, download=False).keys())
            except (MergeError, OSError, ValueError) as exc:
                raise MergeError(f"the export needs the tensor names of the base '{config.base}' (tensors outside "
                                 f"the layers whose names contain a filter), and it cannot be read here: {exc}"
                                 ) from None
        return read

    doc: dict[str, Any] = {
        "merge_method": config.method,
        "base_model": config.base,
        "models": [{"model": e.path, "parameters": _expert_settings(config, e, (lambda: given) if given is not None
                                                                     else None, base_names)}
                   | ({"calibration": e.calibration} if e.calibration else {}) for e in config.experts],
    }
    if not config.base_input:  # mergekit's form without a base_model: the first model gives the layout
        del doc["base_model"]
    if config.params:
        doc["parameters"] = dict(config.params)
    if config.dtype:
        doc["dtype"] = config.dtype
    if config.calibration:
        doc["calibration"] = config.calibration
    if dtype and dtype != config.dtype:  # what is written, not what the inputs are held in
        doc["out_dtype"] = dtype
    if config.tokenizer is not None:
        tokenizer = TokenizerSetting.parse(config.tokenizer).to_dict()
        if set(tokenizer) == {"source"}:
            doc["tokenizer_source"] = tokenizer["source"]  # the same in mergekit, and the form most know
        else:
            doc["tokenizer"] = tokenizer
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False)
