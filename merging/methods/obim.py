"""OBIM: Optimal Brain Iterative Merging (Wang et al., 2025, arXiv 2502.12217) — our reading.

The paper's code is not public; this follows ``shared/notes/obim.md``. Every choice the paper
leaves open is a parameter (the README's OBIM section has the measurements behind the defaults):

* ``saliency`` of a delta entry ``d_ij`` of a linear layer: ``obd`` (default), the diagonal of the
  layer-wise Hessian over calibration inputs, ``s_ij = d_ij^2 * sum_t x_tj^2``; ``obs``,
  ``s_ij = d_ij^2 / [H^-1]_jj`` with ``H = X^T X`` damped (SparseGPT's Hessian, per layer);
  ``magnitude``, ``d^2``. Tensors without statistics (embeddings, norms, experts without
  calibration data) use ``d^2``. Both statistics are per input channel: ``s = d^2 * v_j``.
* ``calibration``: whose texts the statistics come from: each expert's ``own``, the config's
  ``shared`` general text, or ``both``.
* ``granularity`` (the top-k scope): each expert keeps the top ``density`` fraction of its
  saliency per ``row`` (the default: measured best), per ``tensor``, or ``global`` (one budget
  over all its tensors, so that the layers that matter keep more; ``merging.budget``).
* IM: experts are merged one after another through mutually exclusive masks — a position
  taken by an earlier expert is never written again, nothing is averaged:
  ``W = W_base + sum_k weight_k * M_k * d_k`` with ``M_k = top_k AND NOT (M_1 | ... | M_{k-1})``.
* ``rescale``: each expert's kept delta scaled to the L1 norm of its whole delta, per tensor
  (DARE's mass correction; measured over its own top-k mask, before the exclusion).
* ``order``: as listed, or by total kept saliency, largest first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods.base import DENSITY, MergeMethod, Param, TensorInputs
from merging.select import row_topk_mask, topk_mask
from merging.sparsify import l1

SALIENCY = ("obd", "obs", "magnitude")
SCOPES = ("tensor", "row", "global")
CALIBRATION = ("own", "shared", "both")
_EPS = 1e-7  # as ``sparsify.rescalel1``: below it, no rescale


def obm_saliency(delta: Tensor, energy: Tensor | None) -> Tensor:
    """``d^2 * energy`` broadcast over rows when ``energy`` matches the input dimension, else ``d^2``."""
    s = delta.pow(2)
    if energy is not None and delta.dim() == 2 and energy.shape == (delta.shape[1],):
        s = s * energy.to(s.dtype).unsqueeze(0)  # (out, in) * (1, in)
    return s


def top_fraction_mask(scores: Tensor, density: float, per_row: bool) -> Tensor:
    """Boolean mask of the ``int(density * n)`` largest scores (over the tensor, or each row); ties
    at the threshold by position."""
    if density >= 1:
        return torch.ones_like(scores, dtype=torch.bool)
    if not (per_row and scores.dim() >= 2):
        return topk_mask(scores, int(density * scores.numel()))
    rows = scores.reshape(scores.shape[0], -1)
    return row_topk_mask(rows, int(density * rows.shape[1])).reshape(scores.shape)


def stats_reading(params: Mapping[str, Any]) -> str | None:
    """Which calibration statistics a merge with these global parameters reads (None: none),
    e.g. ``obd/own``: the key of ``Merger``'s and ``merge_to_dir``'s ``stats``."""
    if params.get("saliency", "obd") == "magnitude":
        return None
    return f"{params.get('saliency', 'obd')}/{params.get('calibration', 'own')}"


def mass_factor(delta: Tensor, keep: Tensor) -> Tensor | None:
    """``|d|_1 / |keep * d|_1`` as float32 (None where either is ~0), summed in float64 as the fused
    pass does."""
    before, after = l1(delta), l1(torch.where(keep, delta, 0.0))
    return None if before < _EPS or after < _EPS else (before / after).float()


class Obim(MergeMethod):
    name = "obim"
    expert_params = (Param("weight", 1.0), DENSITY)
    global_params = (
        Param("order", "listed", choices=("listed", "saliency")),
        Param("granularity", "row", choices=SCOPES),  # measured best (README, bench/obim.py)
        Param("saliency", "obd", choices=SALIENCY),
        Param("calibration", "own", choices=CALIBRATION),
        Param("rescale", False),
    )

    def masks(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]],
              params: Mapping[str, Any]) -> list[tuple[int, Tensor, Tensor | None]]:
        """``[(expert index, exclusive mask, rescale factor or None)]`` in merge order."""
        stats = t.stats if t.stats and params["saliency"] != "magnitude" else [None] * len(t.deltas)
        scope = params["granularity"]
        scored = []
        for i, (d, e) in enumerate(zip(t.deltas, experts, strict=True)):
            s = obm_saliency(d, stats[i])
            if scope == "global" and e["density"] < 1:
                threshold = t.thresholds[i] if t.thresholds else None
                if threshold is None:
                    raise MergeError(f"tensor '{t.name}': OBIM's global scope needs each expert's saliency threshold")
                keep = s >= threshold
            else:
                keep = top_fraction_mask(s, e["density"], scope == "row")
            factor = mass_factor(d, keep) if params["rescale"] else None
            scored.append((i, keep, factor, float(s.double()[keep].sum())))
        if params["order"] == "saliency":
            scored.sort(key=lambda item: -item[3])
        taken = torch.zeros_like(t.base, dtype=torch.bool)
        out = []
        for i, keep, factor, _mass in scored:
            exclusive = keep & ~taken
            taken |= exclusive
            out.append((i, exclusive, factor))
        return out

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        merged = t.base.clone()
        for i, mask, factor in self.masks(t, experts, params):
            weight = experts[i]["weight"]
            if factor is not None:  # one float32 scale, as the fused pass multiplies
                weight = torch.tensor(weight, dtype=torch.float32, device=factor.device) * factor
            merged += weight * t.deltas[i] * mask
        return merged

    def stats_reading(self, params: Mapping[str, Any]) -> str | None:
        return stats_reading(params)
