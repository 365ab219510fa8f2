"""A study's stored spec as a ``StudySpec`` (parsed once per loaded row), and the objectives
workers build from it (shared by server and worker)."""

from __future__ import annotations

from evals.objective import Objective
from search.spec import StudySpec
from service.db.models import Study

_PARSED = "_mmmo_parsed_spec"


def spec_of(study: Study) -> StudySpec:
    """The study's spec; a stored spec never changes, so each loaded row parses it once."""
    parsed = study.__dict__.get(_PARSED)
    if parsed is None:
        parsed = StudySpec.model_validate(study.spec)
        study.__dict__[_PARSED] = parsed
    return parsed


def objectives_of(spec: StudySpec) -> list[Objective]:
    """Objectives as workers build them; a direction still unset (before submission) reads as maximize."""
    return [Objective(task=o.task, metric=o.metric, filter=o.filter, direction=o.direction or "maximize",
                      samples=o.samples, seed=o.subset_seed, kind=o.kind, data=o.data) for o in spec.objectives]
