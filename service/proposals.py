"""Asking Optuna for a study's next trial: one asker per study at a time, within its budget, and
configurations already evaluated answered from the team's results cache instead of a worker;
configurations being evaluated right now wait for that result instead of being evaluated twice."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from search.optuna_store import OptunaStudies
from search.space import SearchSpace
from service import results
from service.db.models import Study, Trial
from service.specs import objectives_of, spec_of
from service.states import TrialState

# Advisory-lock namespace for "asking Optuna for a trial of study N" (an arbitrary constant).
_ASK_LOCK_NAMESPACE = 0x6D6D6D6F


@contextmanager
def ask_lock(session: Session, study_id: int) -> Iterator[bool]:
    """Whether this process may ask for ``study_id``'s next trial now.

    Servers sharing a PostgreSQL database would otherwise both count "budget left" and both ask.
    The lock is a session-level advisory lock on a connection of its own, so it outlives the
    commits ``results.optuna_call`` makes; a busy study is skipped, not waited for (another server
    is asking for it). On SQLite one server owns the file and ``Services.lock`` serialises it.
    """
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        yield True
        return
    with bind.connect() as conn:
        key = {"ns": _ASK_LOCK_NAMESPACE, "id": study_id}
        got = conn.execute(text("SELECT pg_try_advisory_lock(:ns, :id)"), key).scalar()
        try:
            yield bool(got)
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:ns, :id)"), key)
            conn.commit()


def propose(session: Session, optuna: OptunaStudies, study: Study, now: datetime,
            orphan_grace_s: float = 300.0, twins_in_study_only: bool = False) -> Trial | None:
    """A new queued trial of ``study``, or None if its budget is spent (or another server is asking).

    A configuration the team already evaluated on the same objectives (in any of its studies) is
    answered from its results cache and the next proposal asked for: small NSGA-II populations
    make duplicate children, and warm-started studies repeat their parents' configurations. One
    that a pending trial of the team is evaluating now (its twin) waits for the twin's result
    (``results.complete`` answers it; if the twin fails it is queued to be evaluated), and the
    next proposal is asked for too. Both count against the budget like any proposal.
    ``twins_in_study_only``: a worker that runs this study alone (``mmmo study run``) would
    never lease a twin in another study, so only this study's trials are waited on.
    """
    if results.out_of_time(study, now):
        results.finish_study_if_done(session, optuna, study, now)
        return None
    spec = spec_of(study)
    objectives = objectives_of(spec)
    space = SearchSpace(spec)
    with ask_lock(session, study.id) as mine:
        if not mine:
            return None
        results.fail_orphans(session, optuna, study, orphan_grace_s)
        while results.sampled_count(session, study) < study.budget:
            number, params = results.optuna_call(session, optuna.ask, study.optuna_name, spec)
            config = space.merge_config(params)
            trial = Trial(study_id=study.id, number=number, params=params, merge_config=config.to_dict(),
                          config_hash=config.fingerprint(), state=TrialState.QUEUED)
            values = results.cached_values(session, study.team_id, trial.config_hash, objectives)
            if values is not None:  # told before the row exists: no other server can lease it meanwhile
                results.tell_cached(session, optuna, study, trial, values, now)
            elif (twin := results.waiting_twin(session, study, trial.config_hash,
                                               in_study_only=twins_in_study_only)) is not None:
                trial.waiting_on = twin.id  # in the row from the start: never leased
            session.add(trial)
            session.flush()
            if values is None and trial.waiting_on is None:
                return trial
            results.finish_study_if_done(session, optuna, study, now)
    return None
