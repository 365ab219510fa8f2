"""Final selection of one trial from the Pareto front: knee point, preference weights, or best-of."""

from __future__ import annotations

from collections.abc import Sequence

from search.pareto import knee_point, min_max_scale, pareto_front, sign
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
        s = sign(directions[d])
        return max(front, key=lambda i: s * values[i][d])
    # Weighted sum of min-max normalised objectives, each oriented so that larger is better.
    dims = range(len(keys))
    scaled = min_max_scale(values)

    def utility(i: int) -> float:
        total = 0.0
        for d in dims:
            x = float(scaled[i][d])
            if sign(directions[d]) < 0:
                x = 1.0 - x
            total += (policy.weights or {}).get(keys[d], 0.0) * x
        return total

    return max(front, key=utility)
