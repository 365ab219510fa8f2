"""The FastAPI application: routes are thin, rules live in ``studies`` and ``queue``."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.limits import BodySizeLimit
from service.routes import api_router, health, metrics, web
from service.services import Services
from service.settings import Settings


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    services = services or Services.start(settings or Settings())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        services.close()

    app = FastAPI(title="mmmo", version="0.1.0", lifespan=lifespan,
                  description="Multi-objective search for LLM merges: studies, trials, leases, Pareto fronts.")
    app.state.services = services
    app.add_middleware(BodySizeLimit, max_bytes=services.settings.max_body_bytes)
    app.include_router(api_router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(web.router)
    return app
