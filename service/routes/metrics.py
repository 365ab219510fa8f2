"""``/metrics`` in Prometheus' text format (a handful of gauges: no client library needed)."""

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select

from service.db.models import Study, Trial
from service.deps import SessionDep
from service.states import StudyStatus, TrialState

router = APIRouter()


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(session: SessionDep) -> str:
    studies = dict(session.execute(select(Study.status, func.count()).group_by(Study.status)).all())
    trials = dict(session.execute(select(Trial.state, func.count()).group_by(Trial.state)).all())
    n, total = session.execute(select(func.count(Trial.duration_s), func.sum(Trial.duration_s))).one()
    workers = session.scalar(select(func.count(func.distinct(Trial.worker))).where(Trial.state == TrialState.LEASED))
    lines = ["# HELP mmmo_studies Studies by status.", "# TYPE mmmo_studies gauge"]
    lines += [f'mmmo_studies{{status="{k}"}} {studies.get(k, 0)}' for k in StudyStatus]
    lines += ["# HELP mmmo_trials Trials by state.", "# TYPE mmmo_trials gauge"]
    lines += [f'mmmo_trials{{state="{k}"}} {trials.get(k, 0)}' for k in TrialState]
    lines += ["# HELP mmmo_trial_duration_seconds Wall time of evaluated trials, lease to result.",
              "# TYPE mmmo_trial_duration_seconds summary",
              f"mmmo_trial_duration_seconds_sum {float(total or 0.0)}", f"mmmo_trial_duration_seconds_count {n}",
              "# HELP mmmo_busy_workers Workers holding a lease now.", "# TYPE mmmo_busy_workers gauge",
              f"mmmo_busy_workers {workers}"]
    return "\n".join(lines) + "\n"
