"""From a spec's objectives to the evaluation objects a worker builds (shared by server and worker)."""

from __future__ import annotations

from evals.objective import Objective
from search.spec import StudySpec


def objectives_of(spec: StudySpec) -> list[Objective]:
    """Objectives as workers build them; a direction still unset (before submission) reads as maximize."""
    return [Objective(task=o.task, metric=o.metric, filter=o.filter, direction=o.direction or "maximize",
                      samples=o.samples, seed=o.subset_seed, kind=o.kind, data=o.data) for o in spec.objectives]
