"""OBIM's global top-k scope: one saliency budget per expert across all its tensors.

An expert keeps, over the whole model, the ``sum_t density_t * n_t`` entries of largest saliency,
so the layers whose deltas matter more keep more of them. The threshold comes from a histogram of
every saliency value of the expert, built once per set of models and statistics (the saliency of a
delta does not depend on a trial's parameters) and read per trial: bins are the top 20 bits of the
float32 value (sign, exponent and 11 mantissa bits: 2^-11 relative width), so a trial's threshold
is the lower edge of the bin where the budget runs out, and the kept count exceeds the budget by at
most that bin's population. An exact global top-k would need every value of every tensor at once.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from merging.methods.obim import obm_saliency
from merging.plan import MergePlan

_SHIFT = 11  # float32 bits dropped: 32 - 1 sign - 8 exponent - 12 = 11
BINS = 1 << 20  # saliency is >= 0, so the sign bit is 0 and (bits >> 11) < 2^20


def saliency_histogram(scores: Tensor) -> Tensor:
    """Counts (int64, ``BINS``) of non-negative float32 ``scores`` per bin of their top 20 bits."""
    bits = scores.float().contiguous().view(torch.int32).reshape(-1) >> _SHIFT
    return torch.bincount(bits, minlength=BINS)


def threshold(histogram: Tensor, keep: int) -> float:
    """The largest bin edge at or above which at least ``keep`` values lie (``inf``: keep none)."""
    if keep <= 0:
        return math.inf
    from_top = histogram.flip(0).cumsum(0)  # entries in bins >= BINS - 1 - i
    i = int(torch.searchsorted(from_top, torch.tensor([keep], device=from_top.device)))
    if i >= BINS:
        return 0.0
    return struct.unpack("<f", struct.pack("<i", (BINS - 1 - i) << _SHIFT))[0]


def expert_histograms(tensors: Iterable[tuple[Tensor, Sequence[Tensor], Sequence[Tensor | None]]],
                      experts: int) -> list[Tensor]:
    """Each expert's saliency histogram over ``(base, experts' tensors, experts' statistics)`` per
    tensor (statistics None: magnitude). Non-float tensors have no saliency."""
    hists: list[Tensor | None] = [None] * experts
    for base, held, stats in tensors:
        if not base.is_floating_point():
            continue
        b = base.float()
        for i, (e, stat) in enumerate(zip(held, stats, strict=True)):
            h = saliency_histogram(obm_saliency(e.float() - b, stat))
            hists[i] = h if hists[i] is None else hists[i].add_(h)
    return [torch.zeros(BINS, dtype=torch.int64) if h is None else h for h in hists]


def uses_global(plan: MergePlan, names: Iterable[str]) -> bool:
    return any(plan.params_for(n)[1].get("granularity") == "global" for n in names)


def global_thresholds(plan: MergePlan, numels: Mapping[str, int], histograms: Sequence[Tensor]) -> list[float]:
    """Per expert, the saliency threshold that keeps its budget: ``sum density * numel`` over the
    tensors of ``numels`` (the float tensors the histograms counted), at each tensor's density."""
    budget = [0] * len(histograms)
    for name, n in numels.items():
        experts, _ = plan.params_for(name)
        for i, e in enumerate(experts):
            budget[i] += int(min(1.0, e["density"]) * n)
    return [threshold(h, b) for h, b in zip(histograms, budget, strict=True)]


__all__ = ["BINS", "expert_histograms", "global_thresholds", "saliency_histogram", "threshold", "uses_global"]
