from fastapi import APIRouter

from service import presence
from service.deps import MemberDep, ServicesDep, SessionDep
from service.schemas import WorkerPublic

router = APIRouter(prefix="/workers", tags=["workers"])


@router.get("")
def list_workers(who: MemberDep, services: ServicesDep, session: SessionDep) -> list[WorkerPublic]:
    """Workers seen in the last 24 h (the team's and the worker pool's), and what each runs for the team."""
    return presence.listing(session, who.team_id, services.policy.lease_seconds)
