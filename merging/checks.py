"""The one check of a merge's checkpoints: same tensor names and shapes as the base, and (for
methods that work on deltas) a base that is each expert's ancestor. Errors name the expert."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from merging.errors import IncompatibleCheckpoints, MergeError
from merging.io import CheckpointReader, TensorReader, locate

# A fine-tune moves weights by a small fraction of their norm; an unrelated model by ~sqrt(2).
ANCESTOR_MAX_RELATIVE_DELTA = 0.5
ANCESTRY_PROBES = 3  # matrices compared per expert


def check_compatible(base: TensorReader, experts: Mapping[str, TensorReader], *, ancestry: bool) -> list[str]:
    """The base's tensor names, once every expert has the same tensors with the same shapes
    (and, with ``ancestry``, looks fine-tuned from the base); otherwise an IncompatibleCheckpoints
    (a MergeError) naming the expert."""
    names = base.keys()
    for expert, reader in experts.items():
        missing = sorted(set(names) - set(reader.keys()))
        extra = sorted(set(reader.keys()) - set(names))
        if missing or extra:
            raise IncompatibleCheckpoints(f"model '{expert}': tensors differ from the base (missing {missing[:5]}, "
                                          f"unexpected {extra[:5]})")
        for n in names:
            if reader.shape(n) != base.shape(n):
                raise IncompatibleCheckpoints(f"model '{expert}': tensor '{n}' has shape {reader.shape(n)}, "
                                              f"the base has {base.shape(n)}")
    if ancestry:
        _check_ancestry(base, experts, names)
    return names


def _check_ancestry(base: TensorReader, experts: Mapping[str, TensorReader], names: list[str]) -> None:
    """Refuse a base that is not the experts' ancestor, judged on up to three matrices."""
    probes = [n for n in names if len(base.shape(n)) == 2][:ANCESTRY_PROBES]
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


def check_dirs(base_dir: str | Path, expert_dirs: Mapping[str, str | Path], *, ancestry: bool,
               download: bool = False) -> None:
    """``check_compatible`` on checkpoints named by directory or hub id, reading only their headers
    and, with ``ancestry``, a few matrices: cheap enough for a submit-time check.

    A model that cannot be opened raises its error prefixed with ``base: `` or ``expert '<name>': ``
    (a model not found stays a :class:`merging.io.ModelNotFound`); hub ids are downloaded only
    with ``download``.
    """
    base = _open("base", base_dir, download)
    experts = {name: _open(f"expert '{name}'", path, download) for name, path in expert_dirs.items()}
    check_compatible(base, experts, ancestry=ancestry)


def _open(role: str, ref: str | Path, download: bool) -> CheckpointReader:
    try:
        return CheckpointReader(locate(ref, download=download))
    except MergeError as exc:
        raise type(exc)(f"{role}: {exc}") from exc


__all__ = ["ANCESTOR_MAX_RELATIVE_DELTA", "check_compatible", "check_dirs"]
