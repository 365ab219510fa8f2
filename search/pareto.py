"""Pareto fronts and hypervolume, in any number of objectives, for mixed directions.

Optuna keeps its hypervolume private (``optuna._hypervolume``), so we own a small exact
implementation (recursive slicing: fine for the front sizes a merge study produces).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Point = Sequence[float]


def _to_min(points: Sequence[Point], directions: Sequence[str]) -> list[tuple[float, ...]]:
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    return [tuple(s * v for s, v in zip(signs, p, strict=True)) for p in points]


def pareto_front(points: Sequence[Point], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points, in input order (duplicates of a front point are all kept).

    Points are visited best-first in lexicographic order, so anything that dominates a point is
    visited before it, and (by transitivity) some point already on the front dominates it too:
    each point is checked against the front so far, not against all points.
    """
    if not points:
        return []
    mins = np.asarray(_to_min(points, directions), dtype=float)
    order = np.lexsort(mins.T[::-1])
    front: list[int] = []
    kept = np.empty((0, mins.shape[1]))
    for i in order:
        p = mins[i]
        if kept.size and ((kept <= p).all(1) & (kept < p).any(1)).any():
            continue
        front.append(int(i))
        kept = np.vstack([kept, p])
    return sorted(front)


def _hv_min(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    """Volume dominated by ``points`` (minimisation) and bounded by ``ref``."""
    pts = [p for p in points if all(x < r for x, r in zip(p, ref, strict=True))]
    if not pts:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in pts)
    # Slice along the last axis: between consecutive values, the cross-section is the
    # (d-1)-dimensional volume of the points at or below that value.
    pts.sort(key=lambda p: p[-1])
    volume = 0.0
    for i, p in enumerate(pts):
        upper = pts[i + 1][-1] if i + 1 < len(pts) else ref[-1]
        if upper > p[-1]:
            volume += (upper - p[-1]) * _hv_min([q[:-1] for q in pts[: i + 1]], ref[:-1])
    return volume


def hypervolume(points: Sequence[Point], reference: Point, directions: Sequence[str]) -> float:
    """Hypervolume of ``points`` against ``reference`` (a point worse than any of interest)."""
    if not points:
        return 0.0
    mins = _to_min(points, directions)
    ref = _to_min([reference], directions)[0]
    front = [mins[i] for i in pareto_front(mins, ["minimize"] * len(ref))]
    return _hv_min(list(dict.fromkeys(front)), ref)


def knee_point(points: Sequence[Point], directions: Sequence[str]) -> int | None:
    """Index (into ``points``) of the front point closest to the ideal after min-max scaling."""
    front = pareto_front(points, directions)
    if not front:
        return None
    mins = _to_min([points[i] for i in front], directions)
    dims = range(len(directions))
    lo = [min(p[d] for p in mins) for d in dims]
    hi = [max(p[d] for p in mins) for d in dims]
    def dist(p: tuple[float, ...]) -> float:
        return sum(((p[d] - lo[d]) / (hi[d] - lo[d]) if hi[d] > lo[d] else 0.0) ** 2 for d in dims)
    return front[min(range(len(front)), key=lambda i: dist(mins[i]))]
