"""Pareto fronts and hypervolume, in any number of objectives, for mixed directions.

Optuna keeps its hypervolume private (``optuna._hypervolume``), so we own a small exact
implementation (recursive slicing: fine for the front sizes a merge study produces).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Point = Sequence[float]


def sign(direction: str) -> float:
    """-1 for ``minimize``, else +1: an objective times its sign is to be maximised."""
    return -1.0 if direction == "minimize" else 1.0


def min_max_scale(values: Sequence[Point] | np.ndarray, like: Sequence[Point] | np.ndarray | None = None) -> np.ndarray:
    """Rows of ``values`` with each column mapped to [0, 1] by the min and max of that column of
    ``like`` (default: ``values`` itself); a column whose min and max agree maps to 0."""
    x = np.asarray(values, dtype=float)
    ref = x if like is None else np.asarray(like, dtype=float)
    lo, span = ref.min(0), ref.max(0) - ref.min(0)
    return (x - lo) / np.where(span > 0, span, 1.0)


def reference_point(values: Sequence[Point], directions: Sequence[str], keys: Sequence[str],
                    given: dict[str, float] | None = None) -> list[float]:
    """The hypervolume reference: the spec's point where it gives one (``given``, by objective
    key); else just worse than the worst value seen in each objective (10% of its range, or 0.1)."""
    ref = []
    for d, column in enumerate(zip(*values, strict=True)):
        if given and keys[d] in given:
            ref.append(given[keys[d]])
            continue
        lo, hi = min(column), max(column)
        margin = 0.1 * (hi - lo) or 0.1
        ref.append(lo - margin if sign(directions[d]) > 0 else hi + margin)
    return ref


def _to_min(points: Sequence[Point], directions: Sequence[str]) -> list[tuple[float, ...]]:
    signs = [-sign(d) for d in directions]
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


def hypervolume_improvement(front: Sequence[Point], point: Point, reference: Point,
                            directions: Sequence[str]) -> float:
    """How much ``point`` adds to the hypervolume of ``front``: the volume of its box to the
    reference, less the part of it the front already covers. The front's points are clipped to
    the box first, and only the non-dominated clipped points are measured, so this costs far
    less than measuring the front twice."""
    (p,), ref = _to_min([point], directions), _to_min([reference], directions)[0]
    if any(x >= r for x, r in zip(p, ref, strict=True)):
        return 0.0
    box = 1.0
    for x, r in zip(p, ref, strict=True):
        box *= r - x
    clipped = [tuple(max(a, b) for a, b in zip(q, p, strict=True)) for q in _to_min(front, directions)]
    inside = [c for c in clipped if all(x < r for x, r in zip(c, ref, strict=True))]
    kept = list(dict.fromkeys(inside[i] for i in pareto_front(inside, ["minimize"] * len(ref))))
    return max(0.0, box - _hv_min(kept, ref))


def hypervolume_trace(points: Sequence[Point], reference: Point, directions: Sequence[str]) -> list[float]:
    """Hypervolume of the first 1, 2, ... n points: a point that joins the front adds its
    improvement, a dominated one adds nothing (and the front is never measured again whole)."""
    mins = np.asarray(_to_min(points, directions), dtype=float)
    minimize = ["minimize"] * mins.shape[1] if len(mins) else []
    ref = _to_min([reference], directions)[0]
    front = np.empty((0, mins.shape[1] if len(mins) else 0))
    current, out = 0.0, []
    for p in mins:
        if front.size and ((front <= p).all(1) & (front < p).any(1)).any():
            out.append(current)
            continue
        current += hypervolume_improvement([tuple(q) for q in front], tuple(p), ref, minimize)
        front = np.vstack([front[~((p <= front).all(1) & (p < front).any(1))], p])
        out.append(current)
    return out


def knee_point(points: Sequence[Point], directions: Sequence[str]) -> int | None:
    """Index (into ``points``) of the front point closest to the ideal after min-max scaling."""
    front = pareto_front(points, directions)
    if not front:
        return None
    scaled = min_max_scale(_to_min([points[i] for i in front], directions))
    dist = [sum(float(x) ** 2 for x in row) for row in scaled]
    return front[min(range(len(front)), key=dist.__getitem__)]
