"""Multi-fidelity trials: a ladder of item counts and asynchronous successive halving over it.

An lm_eval objective's ``samples`` is the top rung of a ladder that grows by ``eta`` per rung from
at least ``min_samples`` items (for the objective with the most samples; the others in proportion),
e.g. 25 -> 100 -> 400. A new configuration is scored on the lowest rung. When a rung's result
arrives, the configuration is promoted to the next rung (a new lease, scoring only the items it has
not seen; the earlier items' scores are kept, combined as item-weighted means) if it is non-dominated
among that rung's results so far, or among the top 1/eta of them (by non-dominated layer, then
hypervolume contribution within the layer). No
rung waits for another (ASHA's asynchronous promotion, decided when a result arrives). A
configuration that is not promoted ends at its rung: the sampler is told that value (a noisier
estimate of the same quantity, the documented stand-in for fidelity as a surrogate input), and only
top-rung results enter the front, the selection and the reported hypervolume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from search.pareto import hypervolume, pareto_front, reference_point


@dataclass(frozen=True)
class Ladder:
    """Per rung, each lm_eval objective's task's item count (``counts[r][task]``), nested: rung
    ``r`` scores the items ``counts[r-1][task]`` .. ``counts[r][task]`` of the task's fixed order."""

    counts: tuple[dict[str, int], ...]
    eta: int

    @property
    def top(self) -> int:
        return len(self.counts) - 1

    def window(self, rung: int) -> dict[str, tuple[int, int]]:
        """The items rung ``rung`` scores, per task: ``(first, end)`` positions in its item order."""
        before = self.counts[rung - 1] if rung > 0 else {}
        return {task: (before.get(task, 0), n) for task, n in self.counts[rung].items()}


def ladder(samples: dict[str, int], min_samples: int, eta: int) -> Ladder:
    """The ladder for tasks scored on ``samples`` items each at the top, growing by ``eta`` per rung
    from its lowest, the fewest items of at least ``min_samples`` for the largest task."""
    top = max(samples.values())
    # Down from the top by whole factors of eta (Hyperband's r_max / eta^k): every promotion
    # multiplies the items by eta, with no sliver of a last rung (12 -> 48 -> 50 from 12 up to 50).
    fractions = [1.0]
    while top * fractions[0] / eta >= min_samples:
        fractions.insert(0, fractions[0] / eta)
    counts = tuple({task: max(1, min(n, math.ceil(f * n))) for task, n in samples.items()} for f in fractions)
    return Ladder(counts, eta)


def combine(earlier: Mapping[str, float], new: Mapping[str, float],
            items: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Values over both parts: a key of ``items`` (a per-item mean, with its earlier and new item
    counts) weighted by them; the others (sparsity, perplexity: not per item) as newly measured."""
    out = {}
    for key, value in new.items():
        before, now = items.get(key, (0, 0))
        out[key] = (earlier[key] * before + value * now) / (before + now) if key in items and before + now else value
    return out


def promoted(rung_values: Sequence[Sequence[float]], candidate: int, directions: Sequence[str], eta: int) -> bool:
    """Whether configuration ``candidate`` (an index into ``rung_values``, every configuration's values
    at this rung so far) goes on: non-dominated among them, or in the top ``1/eta`` of them ranked by
    non-dominated layer, then by hypervolume contribution within its layer (ASHA's top 1/eta, for
    several objectives)."""
    if candidate in pareto_front(rung_values, directions):
        return True
    keep = len(rung_values) // eta
    if keep == 0:
        return False
    ref = reference_point(rung_values, directions, [str(i) for i in range(len(rung_values[0]))], None)
    ranked: list[int] = []
    left = list(range(len(rung_values)))
    while left and len(ranked) < keep:
        layer = [left[i] for i in pareto_front([rung_values[j] for j in left], directions)]
        points = [rung_values[j] for j in layer]
        whole = hypervolume(points, ref, directions)
        share = {j: whole - hypervolume([p for i, p in zip(layer, points, strict=True) if i != j], ref, directions)
                 for j in layer}
        ranked += sorted(layer, key=lambda j: -share[j])
        left = [j for j in left if j not in set(layer)]
    return candidate in ranked[:keep]


__all__ = ["Ladder", "combine", "ladder", "promoted"]
