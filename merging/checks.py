"""The one check of a merge's checkpoints: same tensor names and shapes as the base, and (for
methods that work on deltas) a base that is each expert's ancestor. Errors name the expert.

A merge with a tokenizer setting is checked on its aligned readers (``merging.vocab.aligned``):
there the vocabulary tensors have the output vocabulary's rows, whatever each model's own."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

from merging.errors import IncompatibleCheckpoints, MergeError
from merging.io import CheckpointReader, TensorReader, model_dir, open_reference

log = logging.getLogger(__name__)

# A fine-tune moves weights by a small fraction of their norm; an unrelated model by ~sqrt(2).
ANCESTOR_MAX_RELATIVE_DELTA = 0.5
ANCESTRY_PROBES = 3  # matrices compared per expert
PROBE_MAX_ENTRIES = 1 << 24


def check_compatible(base: TensorReader, experts: Mapping[str, TensorReader], *,
                     ancestry: bool | str) -> list[str]:
    """The base's tensor names, once every expert has the same tensors with the same shapes
    (and, with ``ancestry``, looks fine-tuned from the base); otherwise an IncompatibleCheckpoints
    (a MergeError) naming the expert. ``ancestry="warn"``: an unrelated-looking expert is logged
    as a warning, not refused (the user said they know better)."""
    names = base.keys()
    _check_dtypes("the base", base)
    for expert, reader in experts.items():
        _check_dtypes(f"model '{expert}'", reader)
        missing = sorted(set(names) - set(reader.keys()))
        extra = sorted(set(reader.keys()) - set(names))
        if missing or extra:
            raise IncompatibleCheckpoints(f"model '{expert}': tensors differ from the base (missing {missing[:5]}, "
                                          f"unexpected {extra[:5]})")
        for n in names:
            shape, want = reader.shape(n), base.shape(n)
            if shape != want:
                raise IncompatibleCheckpoints(f"model '{expert}': tensor '{n}' has shape {shape}, the base has "
                                              f"{want}{_vocabulary_hint(shape, want)}")
    if ancestry == "warn":
        try:
            _check_ancestry(base, experts, names)
        except IncompatibleCheckpoints as exc:
            log.warning("%s (merging anyway: allow_unrelated)", exc)
    elif ancestry:
        _check_ancestry(base, experts, names)
    return names


def _vocabulary_hint(shape: tuple[int, ...], base: tuple[int, ...]) -> str:
    """What to do when a tensor differs from the base's in its first axis alone, as embeddings
    and output heads of models with other vocabularies do (mergekit's advice)."""
    if len(shape) != len(base) or not shape or shape[1:] != base[1:]:
        return ""
    return (". If the vocabularies differ, align them with a tokenizer setting, as mergekit does: "
            "tokenizer_source: base, union or a model (or tokenizer: {source: ...})")


def _check_dtypes(who: str, reader: TensorReader) -> None:
    """Floating-point weights only, read from the headers: a quantized checkpoint (int8 or packed
    int32 weights, fp8) has no deltas to merge."""
    for n in reader.keys():
        dtype = reader.dtype(n)  # an unknown dtype code (e.g. F8_E4M3) raises here, naming the tensor
        if not dtype.is_floating_point and n.endswith("weight"):
            raise IncompatibleCheckpoints(f"{who}: tensor '{n}' is {str(dtype).removeprefix('torch.')}: a quantized "
                                          "checkpoint cannot be merged; use its unquantized weights")


def check_loadable(model_dir: str | Path, reader: TensorReader | None = None) -> None:
    """The checkpoint's tensors load into the model its config.json describes, by transformers'
    own renames and fusions: every parameter written, with its shape. Builds the model on the
    meta device and reads only headers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from merging.live_layout import LiveLayout

    model_dir = Path(model_dir)
    reader = reader or CheckpointReader(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # an unknown architecture, a malformed config
        raise IncompatibleCheckpoints(f"transformers cannot build a causal LM from its config.json: {exc}") from exc
    try:
        LiveLayout(model, {n: reader.shape(n) for n in reader.keys()}).check()
    except MergeError as exc:
        raise IncompatibleCheckpoints(str(exc)) from exc


def _check_ancestry(base: TensorReader, experts: Mapping[str, TensorReader], names: list[str]) -> None:
    """Refuse a base that is not the experts' ancestor, judged on up to three matrices."""
    # the first matrices, passing over the embedding-sized ones (reading four of those costs seconds)
    matrices = [n for n in names if len(base.shape(n)) == 2]
    modest = [n for n in matrices if math.prod(base.shape(n)) <= PROBE_MAX_ENTRIES]
    probes = (modest if len(modest) >= ANCESTRY_PROBES else matrices)[:ANCESTRY_PROBES]
    if not probes:
        return
    bases = {n: base.get(n).float() for n in probes}
    for expert, reader in experts.items():
        rel = []
        for n in probes:
            b = bases[n]
            rel.append(float((reader.get(n).float() - b).norm() / b.norm().clamp_min(1e-12)))
        if min(rel) > ANCESTOR_MAX_RELATIVE_DELTA:
            raise IncompatibleCheckpoints(f"model '{expert}': does not look fine-tuned from the base (relative "
                                          f"delta {min(rel):.2f} on '{probes[rel.index(min(rel))]}'): is the base "
                                          "its ancestor?")


def check_dirs(base_dir: str | Path, expert_dirs: Mapping[str, str | Path], *, ancestry: bool | str,
               download: bool = False, loadable: bool = False, tokenizer: dict | None = None) -> None:
    """``check_compatible`` on checkpoints named by directory or hub id, reading only their headers
    and, with ``ancestry``, a few matrices: cheap enough for a submit-time check.

    A model that cannot be opened raises its error prefixed with ``base: `` or ``expert '<name>': ``
    (a model not found stays a :class:`merging.io.ModelNotFound`); hub ids are downloaded only
    with ``download``. ``loadable``: also ``check_loadable`` on the base (the experts match it).
    ``tokenizer``: a tokenizer setting, under which the models are compared in the output
    vocabulary (pass every expert at once: the vocabulary depends on them all).
    """
    base = _open("base", base_dir, None, download)
    experts = {name: _open(f"expert '{name}'", path, base_dir, download) for name, path in expert_dirs.items()}
    seen_base, seen_experts = base, experts
    if tokenizer is not None:
        from merging.config import ExpertRef, MergeConfig
        from merging.vocab import aligned

        config = MergeConfig(method="linear", base=str(base_dir), tokenizer=tokenizer,
                             experts=tuple(ExpertRef(name, str(path)) for name, path in expert_dirs.items()))
        seen_base, seen_experts, _ = aligned(config, base, experts)
    check_compatible(seen_base, seen_experts, ancestry=ancestry)
    if loadable:  # the base's own files against its own config
        try:
            check_loadable(model_dir(base_dir, download=download), base)
        except IncompatibleCheckpoints as exc:
            raise IncompatibleCheckpoints(f"base: {exc}") from exc


def _open(role: str, ref: str | Path, base: str | Path | None, download: bool) -> TensorReader:
    try:
        return open_reference(ref, base, download=download)
    except MergeError as exc:
        raise type(exc)(f"{role}: {exc}") from exc


__all__ = ["ANCESTOR_MAX_RELATIVE_DELTA", "check_compatible", "check_dirs", "check_loadable"]
