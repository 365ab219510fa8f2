"""Final selection of one trial from the Pareto front: knee point, preference weights, or best-of."""

from __future__ import annotations

from collections.abc import Sequence

from search.pareto import knee_point, pareto_front
from search.spec import SelectionSpec


def select(values: Sequence[Sequence[float]], keys: Sequence[str], directions: Sequence[str],
           policy: SelectionSpec) -> int | None:
    """Index into ``values`` of the selected point (always a front point), or None if there is none."""
    if not values:
        return None
    if policy.policy == "knee":
        return knee_point(values, directions)
    front = pareto_front(values, directions)
    if policy.policy.startswith("best:"):
        d = list(keys).index(policy.policy.removeprefix("best:"))
        sign = 1.0 if directions[d] == "maximize" else -1.0
        return max(front, key=lambda i: sign * values[i][d])
    # Weighted sum of min-max normalised objectives, each oriented so that larger is better.
    dims = range(len(keys))
    lo = [min(v[d] for v in values) for d in dims]
    hi = [max(v[d] for v in values) for d in dims]

    def utility(i: int) -> float:
        total = 0.0
        for d in dims:
            scaled = (values[i][d] - lo[d]) / (hi[d] - lo[d]) if hi[d] > lo[d] else 0.0
            if directions[d] == "minimize":
                scaled = 1.0 - scaled
            total += (policy.weights or {}).get(keys[d], 0.0) * scaled
        return total

    return max(front, key=utility)
