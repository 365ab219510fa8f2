"""Study rules: create, read, summarise. Plain functions over a session, testable without HTTP."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from evals.catalog import TaskCatalog
from search.constraints import constraint_violations, is_feasible
from search.optuna_store import OptunaStudies
from search.pareto import hypervolume, hypervolume_trace, pareto_front, reference_point
from search.selection import select as select_trial
from search.space import SearchSpace
from search.spec import StudySpec
from service.db.models import Job, Study, Trial
from service.results import cached_values, optuna_call
from service.schemas import HypervolumePoint, ObjectivePublic, ParetoPublic, StudyDetail, StudyPublic, TrialPublic
from service.specs import objectives_of, spec_of
from service.states import StudyStatus, TrialOrigin, TrialState
from service.validation import (
    SpecPolicy,
    SpecProblem,
    resolve_directions,
    resolve_layers,
    space_problems,
    spec_problems,
)


class InvalidSpec(ValueError):
    def __init__(self, problems: list[SpecProblem]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, p.loc))}: {p.msg}" for p in problems))
        self.problems = problems


def optuna_name(spec_name: str) -> str:
    """The Optuna study's name: the spec's, as optuna-dashboard lists it, made unique (specs share
    names across runs and teams; Optuna's names are unique per database), within the column's 200."""
    return f"{spec_name[:185]} [{uuid.uuid4().hex[:12]}]"


def _warm_start_problems(session: Session, spec: StudySpec, team_id: int) -> list[SpecProblem]:
    problems = []
    want = (spec.base, [(e.name, e.path) for e in spec.experts], spec.method)
    for i, source_id in enumerate(spec.warm_start):
        source = get_study(session, source_id, team_id)
        if source is None:
            problems.append(SpecProblem(("warm_start", i), f"study {source_id} not found"))
            continue
        other = spec_of(source)
        if (other.base, [(e.name, e.path) for e in other.experts], other.method) != want:
            problems.append(SpecProblem(("warm_start", i), f"study {source_id} merges other models or another "
                                                           "method; warm starts need the same base, experts, method"))
    return problems


def _seed_from_history(session: Session, optuna: OptunaStudies, study: Study, spec: StudySpec,
                       now: datetime) -> int:
    """Copy the evaluated trials of ``spec.warm_start`` studies into ``study``; returns how many.

    A source trial qualifies when its parameters lie in this study's space and the results cache
    holds every objective of this study for its configuration (nothing is evaluated again).
    """
    space = SearchSpace(spec)
    dists = space.distributions()
    objectives = objectives_of(spec)
    ladder = spec.ladder()
    seen: set[str] = set()
    added = 0
    for source_id in spec.warm_start:
        for t in session.get(Study, source_id).trials:
            if t.state != TrialState.COMPLETE or set(t.params) != set(dists):
                continue
            if not all(dists[k]._contains(dists[k].to_internal_repr(v)) for k, v in t.params.items()):
                continue
            config = space.merge_config(t.params)
            values = cached_values(session, study.team_id, config.fingerprint(), objectives)
            if values is None or config.fingerprint() in seen:
                continue
            seen.add(config.fingerprint())
            number = optuna_call(session, optuna.add_evaluated, study.optuna_name, spec, t.params,
                                 [values[o.key] for o in objectives], constraint_violations(spec, values))
            session.add(Trial(study_id=study.id, number=number, params=t.params, merge_config=config.to_dict(),
                              config_hash=config.fingerprint(), state=TrialState.COMPLETE, values=values,
                              cached=True, origin=TrialOrigin.WARM_START, finished_at=now,
                              rung=None if ladder is None else ladder.top))  # the cache: full fidelity
            added += 1
    session.commit()
    return added


def create_study(session: Session, optuna: OptunaStudies, catalog: TaskCatalog, spec: StudySpec, *,
                 team_id: int, created_by: str | None = None, now: datetime, policy: SpecPolicy) -> Study:
    """Check ``spec`` against the world as ``policy`` lets the server see it, then store it."""
    problems = spec_problems(spec, catalog, policy) + _warm_start_problems(session, spec, team_id)
    if problems:
        raise InvalidSpec(problems)
    try:
        spec = resolve_layers(spec)
    except (OSError, ValueError) as exc:
        raise InvalidSpec([SpecProblem(("search_space", "num_layers"), str(exc))]) from None
    if space_problems(spec):
        raise InvalidSpec(space_problems(spec))
    spec = resolve_directions(spec, catalog, policy)
    study = Study(team_id=team_id, created_by=created_by, name=spec.name, spec=spec.model_dump(mode="json"),
                  budget=spec.budget.trials, created_at=now,
                  optuna_name=optuna_name(spec.name), status=StudyStatus.RUNNING)
    optuna.create(study.optuna_name, spec)
    try:
        session.add(study)
        session.commit()
        _seed_from_history(session, optuna, study, spec, now)
    except Exception:
        session.rollback()
        optuna.delete(study.optuna_name)
        if study.id is not None:
            session.delete(study)
            session.commit()
        raise
    return study


def get_study(session: Session, study_id: int, team_id: int | None) -> Study | None:
    """The study if it exists and belongs to ``team_id`` (any team's if None: internal callers)."""
    study = session.get(Study, study_id)
    if study is None or (team_id is not None and study.team_id != team_id):
        return None
    return study


def get_trial(study: Study, number: int) -> Trial | None:
    return next((t for t in study.trials if t.number == number), None)


def list_studies(session: Session, team_id: int, *, status: str | None = None, method: str | None = None,
                 model: str | None = None, text: str | None = None) -> list[Study]:
    """A team's history, newest first; ``model`` matches the base or any expert path, ``text`` the
    name and creator too."""
    query = select(Study).where(Study.team_id == team_id).order_by(Study.id.desc())
    if status:
        query = query.where(Study.status == status)
    found = list(session.scalars(query))

    def matches(study: Study) -> bool:
        spec = study.spec
        paths = [spec["base"], *(e["path"] for e in spec["experts"])]
        methods = spec["method"] if isinstance(spec["method"], list) else [spec["method"]]
        return ((method is None or method in methods)
                and (model is None or any(model in p for p in paths))
                and (text is None or text.lower() in " ".join([study.name, study.created_by or "", *paths]).lower()))

    return [s for s in found if matches(s)]


def cancel_study(session: Session, optuna: OptunaStudies, study: Study, now: datetime) -> Study:
    """No new trials; queued ones fail; running ones fail at their next heartbeat."""
    if study.status != StudyStatus.RUNNING:
        return study
    for trial in [t for t in study.trials if t.state == TrialState.QUEUED]:
        optuna_call(session, optuna.fail, study.optuna_name, spec_of(study), trial.number)
        trial.state, trial.error, trial.finished_at = TrialState.FAILED, "study cancelled", now
    study.status, study.finished_at = StudyStatus.CANCELLED, now
    session.commit()
    return study


def delete_study(session: Session, optuna: OptunaStudies, study: Study) -> None:
    """The study, its trials, jobs and their archives, and its Optuna study; the results cache
    keeps its (reusable) values."""
    name = study.optuna_name
    archives = [Path(j.artifact) for j in session.scalars(select(Job).where(Job.study_id == study.id)) if j.artifact]
    session.delete(study)
    session.commit()
    optuna.delete(name)
    for path in archives:
        path.unlink(missing_ok=True)


def _objectives(study: Study) -> list[ObjectivePublic]:
    return [ObjectivePublic(key=o.key, kind=o.kind, task=o.task, metric=o.metric, direction=o.direction)
            for o in objectives_of(spec_of(study))]


def trial_public(t: Trial) -> TrialPublic:
    return TrialPublic(number=t.number, state=t.state, params=t.params, values=t.values, error=t.error,
                       worker=t.worker, attempts=t.attempts, cached=t.cached,
                       started_at=t.started_at, finished_at=t.finished_at, duration_s=t.duration_s,
                       items=t.items, eval_seconds=t.eval_seconds, rung=t.rung)


def state_counts(session: Session, study_ids: list[int]) -> dict[int, dict[str, int]]:
    """Trials by state for many studies, in one grouped query (not by loading their trials)."""
    counts: dict[int, dict[str, int]] = {i: {} for i in study_ids}
    rows = session.execute(select(Trial.study_id, Trial.state, func.count()).where(Trial.study_id.in_(study_ids))
                           .group_by(Trial.study_id, Trial.state))
    for study_id, state, n in rows:
        counts[study_id][state] = n
    return counts


def study_public(study: Study, counts: dict[str, int] | None = None) -> StudyPublic:
    if counts is None:
        counts = dict(Counter(t.state for t in study.trials))
    return StudyPublic(id=study.id, name=study.name, status=study.status, error=study.error,
                       method=study.spec["method"],
                       budget=study.budget, created_at=study.created_at, finished_at=study.finished_at,
                       created_by=study.created_by, base=study.spec["base"],
                       experts=[e["name"] for e in study.spec["experts"]],
                       objectives=_objectives(study), counts=counts)


def study_detail(study: Study) -> StudyDetail:
    return StudyDetail(**study_public(study).model_dump(), spec=study.spec,
                       trials=[trial_public(t) for t in study.trials])


def _feasible_points(study: Study) -> tuple[list[Trial], list[list[float]], StudySpec]:
    """Completed, feasible trials (one per configuration) in finishing order, and their values."""
    spec = spec_of(study)
    keys = [o.key for o in objectives_of(spec)]
    ladder = spec.ladder()  # multi-fidelity: only full-fidelity results enter the front and the selection
    done = sorted((t for t in study.trials if t.state == TrialState.COMPLETE
                   and (ladder is None or t.rung == ladder.top)), key=lambda t: (t.finished_at, t.number))
    unique = list({t.config_hash: t for t in reversed(done)}.values())[::-1]  # first of each configuration
    feasible = [t for t in unique if is_feasible(spec, t.values)]
    return feasible, [[t.values[k] for k in keys] for t in feasible], spec


def results_version(session: Session, study: Study) -> tuple:
    """Changes whenever a trial of ``study`` completes: the key under which fronts are cached."""
    count, last = session.execute(select(func.count(), func.max(Trial.finished_at))
                                  .where(Trial.study_id == study.id, Trial.state == TrialState.COMPLETE)).one()
    return study.id, count, last


def pareto(study: Study) -> ParetoPublic:
    objectives = _objectives(study)
    keys, directions = [o.key for o in objectives], [o.direction for o in objectives]
    done, values, spec = _feasible_points(study)
    if not done:
        return ParetoPublic(objectives=objectives, front=[], selected=None, hypervolume=0.0, reference=[])
    front = pareto_front(values, directions)
    front_values = [values[i] for i in front]
    chosen = select_trial(front_values, keys, directions, spec.selection)  # the selection is a front point
    ref = reference_point(values, directions, keys, spec.reference_point)
    return ParetoPublic(objectives=objectives, front=[trial_public(done[i]) for i in front],
                        selected=done[front[chosen]].number if chosen is not None else None,
                        hypervolume=hypervolume(front_values, ref, directions), reference=ref)


def hypervolume_history(study: Study) -> list[HypervolumePoint]:
    """Hypervolume of the feasible front after each completed trial, against the final reference."""
    done, values, spec = _feasible_points(study)
    objectives = _objectives(study)
    directions, keys = [o.direction for o in objectives], [o.key for o in objectives]
    if not done:
        return []
    ref = reference_point(values, directions, keys, spec.reference_point)
    trace = hypervolume_trace(values, ref, directions)
    return [HypervolumePoint(trial=t.number, hypervolume=h) for t, h in zip(done, trace, strict=True)]
