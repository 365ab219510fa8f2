from fastapi import APIRouter

from service.routes import events, health, jobs, leases, metrics, studies, web, workers

api_router = APIRouter(prefix="/api/v1")
api_router.include_router(studies.router)
api_router.include_router(events.router)
api_router.include_router(leases.router)
api_router.include_router(jobs.router)
api_router.include_router(workers.router)

__all__ = ["api_router", "health", "metrics", "web"]
