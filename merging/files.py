"""The file path of the merge engine: stream tensors from checkpoints into a new checkpoint.

One tensor at a time is read from the base and each expert, merged, cast and buffered into
the current output shard, so peak memory stays near a few times the largest tensor rather
than the model size. Output is written to a temporary directory and renamed into place: an
error never leaves a partial OUT_DIR behind.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from merging.budget import expert_histograms, global_thresholds, uses_global
from merging.checks import check_compatible
from merging.config import MergeConfig
from merging.errors import MergeError
from merging.io import BIN_INDEX, SAFETENSORS_INDEX, SafetensorsWriter, model_dir, open_reference
from merging.kernels.fused import Kernels
from merging.mergekit_yaml import to_mergekit
from merging.plan import MergePlan
from merging.saliency import Stats
from merging.step import merge_one
from merging.vocab import aligned, write_vocabulary

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise MergeError(f"unknown dtype '{name}'; known: {sorted(DTYPES)}") from None


def _held(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _model_card(config: MergeConfig, dtype: str | None, names: list[str]) -> str:
    """The output's README: the merge as mergekit YAML, or as our config where mergekit has no form for it."""
    try:
        text = to_mergekit(config, dtype, tensor_names=names)
    except MergeError:
        import yaml

        text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    return ("---\nlibrary_name: transformers\ntags: [merge, mmmo]\n---\n"
            f"# Merged with mmmo ({config.method})\n\nBase: `{config.base}`\n\n"
            "Experts: " + ", ".join(f"`{e.path}`" for e in config.experts) + "\n\n"
            f"## Merge configuration\n\n```yaml\n{text}```\n")


def _copy_side_files(base_dir: Path, out: Path, dtype: torch.dtype | None) -> None:
    """Config, tokenizer and generation files come from the base; weights do not."""
    for f in base_dir.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in (SAFETENSORS_INDEX, BIN_INDEX,
                                                                                  "README.md"):
            shutil.copy2(f, out / f.name)
    if dtype is not None and (out / "config.json").exists():
        cfg = json.loads((out / "config.json").read_text())
        name = str(dtype).removeprefix("torch.")
        cfg["torch_dtype"] = name
        if "dtype" in cfg:
            cfg["dtype"] = name
        (out / "config.json").write_text(json.dumps(cfg, indent=2))


class _ShardWriter:
    """Shards planned up front from the known shapes, each tensor written to disk as it comes."""

    def __init__(self, out: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> None:
        self.out = out
        self.shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = math.prod(entry[2]) * torch.empty((), dtype=entry[1]).element_size()
            if self.shards[-1] and size + nbytes > max_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(entry)
            size += nbytes
        self.total = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for _, d, s in plan)
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                           for i in range(n)]
        self.shard_of = {name: i for i, shard in enumerate(self.shards) for name, _, _ in shard}
        self._open: tuple[int, SafetensorsWriter] | None = None

    def add(self, name: str, tensor: Tensor) -> None:
        i = self.shard_of[name]
        if self._open is None or self._open[0] != i:
            if self._open is not None:
                self._open[1].close()
            self._open = (i, SafetensorsWriter(self.out / self.files[i], self.shards[i]))
        self._open[1].write(name, tensor)

    def finish(self) -> None:
        if self._open is not None:
            self._open[1].close()
        if len(self.files) > 1:
            weight_map = {name: self.files[i] for name, i in self.shard_of.items()}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))


def merge_to_dir(config: MergeConfig, out_dir: str | Path, *, dtype: str | None = None, device: str = "cpu",
                 max_shard_bytes: int = 5 * 2**30, stats: Stats | None = None,
                 progress: Callable[[str, int, int], None] | None = None, kernels: Kernels | None = None) -> Path:
    """Merge ``config`` into a new HF model directory ``out_dir``; returns it. ``kernels``: what runs
    the fused merges (by default compiled for large tensors). ``stats``: calibration statistics by
    reading (``Merger``'s); OBIM's global scope reads every tensor once more, first, for its budget."""
    kernels = kernels or Kernels()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MergeError(f"output directory '{out_dir}' exists and is not empty")
    # The config's dtype is what the inputs are held in, as a worker holds them (mergekit's `dtype`);
    # ``dtype`` (mergekit's `out_dtype`) what is written, by default the held one.
    held = parse_dtype(config.dtype)
    dtype = dtype if dtype is not None else config.dtype
    out_dtype = parse_dtype(dtype)
    MergePlan(config)  # a bad parameter fails before any checkpoint is opened
    base = open_reference(config.base)
    readers = {e.name: open_reference(e.path, config.base) for e in config.experts}  # LoRA experts: on the base
    # With a tokenizer setting, every model's embeddings and output head come in the output vocabulary.
    base, readers, vocab = aligned(config, base, readers, dtype=held)
    names = check_compatible(base, readers, ancestry=config.ancestry)
    plan_params = MergePlan(config, names=names)  # and every tensor's, before any is merged
    names_k = plan_params.names
    card = _model_card(config, dtype, names)  # before any tensor: nothing is merged for a card that fails
    dev = torch.device(device)
    reading = plan_params.stats_reading(names)
    held_stats = (stats or {}).get(reading, {}) if reading is not None else {}

    def stats_of(name: str) -> list[Tensor | None]:
        return [held_stats.get(e, {}).get(name) for e in names_k]

    def read(name: str) -> tuple[Tensor, list[Tensor]]:
        return _held(base.get(name), held), [_held(readers[e].get(name), held).to(dev) for e in names_k]

    thresholds = None
    if uses_global(plan_params, names):
        hists = expert_histograms(((b.to(dev), experts, stats_of(n)) for n in names for b, experts in [read(n)]),
                                  len(names_k))
        numels = {n: math.prod(base.shape(n)) for n in names if base.dtype(n).is_floating_point}
        thresholds = global_thresholds(plan_params, numels, hists)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        # Float tensors are written in out_dtype (by default the held dtype); others as they are.
        plan = [(n, out_dtype if out_dtype and base.dtype(n).is_floating_point else base.dtype(n), base.shape(n))
                for n in names]
        writer = _ShardWriter(staging, plan, max_shard_bytes)
        for i, name in enumerate(names):
            b, experts = read(name)
            target = out_dtype if out_dtype and b.is_floating_point() else b.dtype
            # the experts' tensors were read for this merge: the reference path may reuse them
            merged = merge_one(plan_params, name, b.to(dev), experts, stats_of(name), target, kernels, fresh=True,
                               thresholds=thresholds)
            writer.add(name, merged.cpu())
            del experts, merged
            if progress:
                progress(name, i + 1, len(names))
        writer.finish()
        _copy_side_files(model_dir(config.base), staging, out_dtype)
        if vocab is not None:
            write_vocabulary(vocab, staging)  # its tokenizer and vocab_size, not the base's
        (staging / "README.md").write_text(card)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
