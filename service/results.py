"""What a trial's outcome does: Optuna is told, the results cache is filled, the study finishes,
and the trials waiting on it (the same configuration, proposed while it ran) are answered from it.

Optuna writes through its own connection. On SQLite a write transaction of ours would block
it (and a read snapshot of ours would go stale under it), so every Optuna call is made with
no transaction of ours open: ``optuna_call`` commits first. Optuna is always told before our
row changes, and telling is idempotent, so a crash in between heals on the next report. Our
rows of one outcome (the trial, the cache, its waiters, the study) change in one transaction.

The results cache is a team's: values one team's workers posted never answer another team's trial.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, aliased

from evals.objective import COST_KINDS, Objective
from search.constraints import constraint_violations
from search.fidelity import Ladder, combine, promoted
from search.optuna_store import OptunaStudies
from service.db.models import Result, Study, Trial
from service.lease_source import Cost
from service.leases import requeue
from service.specs import objectives_of, spec_of
from service.states import FINISHED_TRIAL, PENDING_TRIAL, StudyStatus, TrialOrigin, TrialState

MAX_IDENTICAL_LOAD_FAILURES = 3  # trials failed with one load error before their study fails with it


class BadResult(ValueError):
    """A result that does not match the study's objectives."""


def optuna_call(session: Session, call: Callable[..., Any], *args: Any) -> Any:
    session.commit()
    return call(*args)


def cached_values(session: Session, team_id: int, config_hash: str,
                  objectives: list[Objective]) -> dict[str, float] | None:
    """``team_id``'s stored values of every objective for this configuration, or None if any is missing."""
    known = dict(session.execute(
        select(Result.objective_hash, Result.value).where(Result.team_id == team_id, Result.config_hash == config_hash)
    ).all())
    if not all(o.identity() in known for o in objectives):
        return None
    return {o.key: known[o.identity()] for o in objectives}


def _store(session: Session, team_id: int, config_hash: str, objectives: list[Objective],
           values: dict[str, float]) -> None:
    have = set(session.scalars(select(Result.objective_hash)
                               .where(Result.team_id == team_id, Result.config_hash == config_hash)))
    for o in objectives:
        if o.identity() not in have:
            session.add(Result(team_id=team_id, config_hash=config_hash, objective_hash=o.identity(),
                               value=float(values[o.key])))


def checked_values(study: Study, values: dict[str, float]) -> list[float]:
    """``values`` in objective order; refused unless they are finite and name exactly the objectives."""
    keys = [o.key for o in objectives_of(spec_of(study))]
    if sorted(values) != sorted(keys):
        raise BadResult(f"values must have exactly the keys {keys}, got {sorted(values)}")
    ordered = [float(values[k]) for k in keys]
    if not all(math.isfinite(v) for v in ordered):
        raise BadResult(f"values must be finite numbers, got {values}")
    return ordered


def _tell(session: Session, optuna: OptunaStudies, study: Study, trial: Trial, values: dict[str, float]) -> None:
    spec = spec_of(study)
    optuna_call(session, optuna.tell, study.optuna_name, spec, trial.number,
                [values[o.key] for o in objectives_of(spec)], constraint_violations(spec, values))


def _answered(trial: Trial, study: Study, values: dict[str, float], now: datetime, rung: int | None = None) -> None:
    """The row of a trial of ``study`` answered without being evaluated (from the cache or its twin's
    result, measured at ``rung`` of a multi-fidelity ladder: the cache holds top-rung values)."""
    trial.state, trial.values, trial.cached, trial.finished_at = TrialState.COMPLETE, values, True, now
    trial.waiting_on = None
    ladder = spec_of(study).ladder()
    trial.rung = None if ladder is None else (ladder.top if rung is None else rung)


def tell_cached(session: Session, optuna: OptunaStudies, study: Study, trial: Trial, values: dict[str, float],
                now: datetime) -> None:
    """A new trial whose configuration the cache already answers: complete at once, never leased."""
    _tell(session, optuna, study, trial, values)
    _answered(trial, study, values, now)


def waiting_twin(session: Session, study: Study, config_hash: str, *, in_study_only: bool = False) -> Trial | None:
    """A pending trial of ``study``'s team (of ``study`` itself, with ``in_study_only``) evaluating
    ``config_hash`` on (at least) ``study``'s objectives, in a running study: a new trial of that
    configuration waits for its result."""
    wanted = {o.identity() for o in objectives_of(spec_of(study))}
    query = select(Trial).join(Study).where(Study.team_id == study.team_id, Study.status == StudyStatus.RUNNING,
                                            Trial.config_hash == config_hash, Trial.state.in_(PENDING_TRIAL),
                                            Trial.waiting_on.is_(None))
    if in_study_only:
        query = query.where(Trial.study_id == study.id)
    candidates = session.scalars(query.order_by(Trial.id))
    for twin in candidates:
        if wanted <= {o.identity() for o in objectives_of(spec_of(twin.study))}:
            return twin
    return None


def _waiters(session: Session, twin: Trial) -> list[Trial]:
    return list(session.scalars(select(Trial).where(Trial.waiting_on == twin.id, Trial.state == TrialState.QUEUED)
                                .order_by(Trial.id).with_for_update()))


def _wait_again(session: Session, waiter: Trial) -> None:
    """``waiter``'s twin will not answer it: it waits on another pending twin if there is one,
    else it is queued to be evaluated itself (and its fellow waiters then wait on it)."""
    twin = waiting_twin(session, waiter.study, waiter.config_hash)
    waiter.waiting_on = twin.id if twin is not None else None
    session.flush()


def _release_waiters(session: Session, twin: Trial) -> None:
    """``twin`` (no longer pending) will not produce a result: one of its waiters is queued to be
    evaluated, and the others wait on that one."""
    for waiter in _waiters(session, twin):
        _wait_again(session, waiter)


def _keyed(values: dict[str, float], study: Study) -> dict[str, float]:
    return {o.key: values[o.key] for o in objectives_of(spec_of(study))}


def next_rung(trial: Trial) -> int:
    """The multi-fidelity rung a trial's next lease scores: 0 for a new configuration, else the one
    above the last it reached."""
    return 0 if trial.rung is None else trial.rung + 1


def _climb(session: Session, trial: Trial, ladder: Ladder, spec, values: dict[str, float]
           ) -> tuple[dict[str, float], bool]:
    """A rung's result (``values``: its window's items alone) folded into the trial's: item-weighted
    with the earlier rungs' scores. Returns the combined values and whether the configuration is
    promoted to the next rung (``search.fidelity.promoted`` among this rung's results so far)."""
    rung = next_rung(trial)
    if rung > 0:
        before, now = ladder.counts[rung - 1], ladder.window(rung)
        items = {o.key: (before[o.task], now[o.task][1] - now[o.task][0]) for o in objectives_of(spec)
                 if o.kind == "lm_eval"}
        total = (sum(before.values()), sum(end - first for first, end in now.values()))
        items |= {o.key: total for o in objectives_of(spec) if o.kind in COST_KINDS}
        values = combine(trial.values, values, items)
    trial.rung, trial.rungs, trial.values = rung, [*(trial.rungs or []), values], values
    if rung == ladder.top:
        return values, False
    session.flush()
    peers = list(session.scalars(select(Trial).where(Trial.study_id == trial.study_id, Trial.rungs.is_not(None))
                                 .order_by(Trial.id)))
    reached = [t for t in peers if len(t.rungs) > rung]
    keys = [o.key for o in objectives_of(spec)]
    points = [[t.rungs[rung][k] for k in keys] for t in reached]
    directions = [o.direction for o in objectives_of(spec)]
    return values, promoted(points, reached.index(trial), directions, ladder.eta)


def complete(session: Session, optuna: OptunaStudies, trial: Trial, values: dict[str, float],
             now: datetime, cost: Cost | None = None) -> Trial:
    """A leased trial's objective values: told to Optuna, cached for the team's later trials,
    stored; the trials waiting on it get the same values (told to Optuna first, then one commit).
    With multi-fidelity, a rung's values are folded into the trial's and, if it is promoted, the
    trial is queued for the next rung instead (nothing told or cached until its ladder ends)."""
    study = trial.study
    spec = spec_of(study)
    checked_values(study, values)
    if cost is not None and cost.items is not None:  # summed over a trial's rungs
        trial.items = (trial.items or 0) + cost.items
    if cost is not None and cost.seconds is not None:
        trial.eval_seconds = (trial.eval_seconds or 0.0) + cost.seconds
    ladder = spec.ladder()
    if ladder is not None:
        values, promote = _climb(session, trial, ladder, spec, values)
        if promote:
            requeue(trial)
            trial.attempts = 0  # the next rung is new work, with its own attempts
            session.commit()
            return trial
    ordered = checked_values(study, values)
    waiters = _waiters(session, trial)
    optuna_call(session, optuna.tell, study.optuna_name, spec, trial.number, ordered,
                constraint_violations(spec, values))
    for waiter in waiters:
        _tell(session, optuna, waiter.study, waiter, _keyed(values, waiter.study))
    if ladder is None or trial.rung == ladder.top:  # the cache holds full-fidelity values only
        _store(session, study.team_id, trial.config_hash, objectives_of(spec), values)
    trial.state, trial.values, trial.lease_token, trial.finished_at = TrialState.COMPLETE, values, None, now
    trial.duration_s = (now - trial.started_at).total_seconds() if trial.started_at else None
    trial.lease_holder_id = None
    for waiter in waiters:
        _answered(waiter, waiter.study, _keyed(values, waiter.study), now, trial.rung)
    for done in {study.id: study, **{w.study_id: w.study for w in waiters}}.values():
        finish_study_if_done(session, optuna, done, now)
    session.commit()
    return trial


def fail(session: Session, optuna: OptunaStudies, trial: Trial, error: str, now: datetime, *,
         load_failure: bool = False) -> Trial:
    """The trial cannot be evaluated (bad merge, NaN score, cancelled study): no retry. Trials
    waiting on it are queued to be evaluated themselves.

    ``load_failure``: its worker could not load the study's models. Every later trial would load
    the same set, so the study fails once ``MAX_IDENTICAL_LOAD_FAILURES`` of its trials failed so
    with this same ``error`` (before the budget could end it as done with nothing to show)."""
    optuna_call(session, optuna.fail, trial.study.optuna_name, spec_of(trial.study), trial.number)
    trial.state, trial.error, trial.lease_token, trial.finished_at = TrialState.FAILED, error, None, now
    trial.lease_holder_id = trial.waiting_on = None
    trial.load_failure = load_failure
    _release_waiters(session, trial)
    if load_failure and (times := identical_load_failures(session, trial.study, error)) >= MAX_IDENTICAL_LOAD_FAILURES:
        fail_study(session, optuna, trial.study,
                   f"every worker that tried could not load the models ({times} times): {error}", now)
    finish_study_if_done(session, optuna, trial.study, now)
    return trial


def identical_load_failures(session: Session, study: Study, error: str) -> int:
    """The study's trials that failed because a worker could not load its models, with ``error``."""
    session.flush()
    return session.scalar(select(func.count()).select_from(Trial).where(
        Trial.study_id == study.id, Trial.state == TrialState.FAILED, Trial.load_failure.is_(True),
        Trial.error == error))


def settle_waiters(session: Session, optuna: OptunaStudies, now: datetime) -> None:
    """Waiters whose twin is no longer pending although it did not settle them (it completed or
    failed on another server while they were being proposed, its study was deleted or cancelled):
    answered from the team's cache when it has their values, else as ``_wait_again``."""
    twin = aliased(Trial)
    stuck = session.scalars(
        select(Trial).outerjoin(twin, twin.id == Trial.waiting_on)
        .where(Trial.state == TrialState.QUEUED, Trial.waiting_on.is_not(None),
               or_(twin.id.is_(None), twin.state.not_in(PENDING_TRIAL), twin.waiting_on.is_not(None)))
        .order_by(Trial.id).with_for_update(of=Trial, skip_locked=True)
    ).all()
    for waiter in stuck:
        study = waiter.study
        values = cached_values(session, study.team_id, waiter.config_hash, objectives_of(spec_of(study)))
        if values is None:
            _wait_again(session, waiter)
            continue
        _tell(session, optuna, study, waiter, values)
        _answered(waiter, study, values, now)
        finish_study_if_done(session, optuna, study, now)


def fail_study(session: Session, optuna: OptunaStudies, study: Study, reason: str, now: datetime) -> None:
    """The study cannot run at all (a worker found its checkpoints incompatible, or workers could
    not load its models again and again): its pending trials fail with the reason and no more
    are asked for."""
    if study.status != StudyStatus.RUNNING:
        return
    for trial in [t for t in study.trials if t.state in PENDING_TRIAL]:
        optuna_call(session, optuna.fail, study.optuna_name, spec_of(study), trial.number)
        trial.state, trial.error, trial.lease_token, trial.finished_at = TrialState.FAILED, reason, None, now
        trial.lease_holder_id = trial.waiting_on = None
        _release_waiters(session, trial)
    study.status, study.error, study.finished_at = StudyStatus.FAILED, reason, now
    fail_orphans(session, optuna, study, older_than_s=0.0)


def out_of_time(study: Study, now: datetime) -> bool:
    seconds = study.spec.get("budget", {}).get("seconds")
    return seconds is not None and (now - study.created_at).total_seconds() > seconds


def sampled_count(session: Session, study: Study) -> int:
    """Trials the study's sampler proposed (warm-start copies are outside the budget)."""
    return session.scalar(select(func.count()).select_from(Trial)
                          .where(Trial.study_id == study.id, Trial.origin == TrialOrigin.SAMPLER))


def finish_study_if_done(session: Session, optuna: OptunaStudies, study: Study, now: datetime) -> None:
    """Done when the trial budget is spent, or the time budget is and nothing is in flight.
    Then no ask can be in flight either, so trials Optuna handed out that never got a row (their
    server died mid-ask) are failed at once rather than left running in Optuna's records."""
    if study.status != StudyStatus.RUNNING:
        return
    counts = dict(session.execute(
        select(Trial.state, func.count()).where(Trial.study_id == study.id, Trial.origin == TrialOrigin.SAMPLER)
        .group_by(Trial.state)
    ).all())
    finished = sum(counts.get(s, 0) for s in FINISHED_TRIAL)
    in_flight = sum(counts.get(s, 0) for s in PENDING_TRIAL)
    if finished >= study.budget or (out_of_time(study, now) and in_flight == 0):
        study.status, study.finished_at = StudyStatus.DONE, now
        fail_orphans(session, optuna, study, older_than_s=0.0)


def fail_orphans(session: Session, optuna: OptunaStudies, study: Study, older_than_s: float) -> list[int]:
    """Fail Optuna trials that were asked but never got a row of ours (the process asking died
    in between). Only those older than ``older_than_s``: another server may be mid-ask."""
    spec = spec_of(study)
    known = set(session.scalars(select(Trial.number).where(Trial.study_id == study.id)))
    cutoff = datetime.now() - timedelta(seconds=older_than_s)  # Optuna stores local naive times
    orphans = [n for n, started in optuna_call(session, optuna.running_since, study.optuna_name, spec).items()
               if n not in known and (started is None or started <= cutoff)]
    for number in orphans:
        optuna_call(session, optuna.fail, study.optuna_name, spec, number)
    return orphans
