from fastapi import APIRouter

from service.routes import events, health, jobs, leases, metrics, studies, web, workers
from service.schemas import error_responses

# The error statuses each router answers with, in the schema (422s are FastAPI's HTTPValidationError).
api_router = APIRouter(prefix="/api/v1", responses=error_responses(400, 401, 403, 413, 422))
api_router.include_router(studies.router, responses=error_responses(404))
api_router.include_router(events.router, responses=error_responses(404))
api_router.include_router(leases.router, responses=error_responses(409))
api_router.include_router(jobs.router, responses=error_responses(404, 409))
api_router.include_router(workers.router)

__all__ = ["api_router", "health", "metrics", "web"]
