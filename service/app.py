"""The FastAPI application: routes are thin, rules live in plain modules (``studies``, ``dispatch``,
``results``, ``jobs``); their errors become HTTP statuses here, once."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.leases import StaleLease
from service.limits import BodySizeLimit, bounded_errors
from service.results import BadResult
from service.routes import api_router, health, metrics, web
from service.services import Services
from service.settings import Settings
from service.studies import InvalidSpec


async def _stale_lease(_request: Request, exc: Exception) -> JSONResponse:
    """The lease is no longer held (expired, re-leased, finished, study stopped): stop the work."""
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_409_CONFLICT)


def _unprocessable(message: str) -> RequestValidationError:
    """A 422 in the one shape the schema gives every 422 (``HTTPValidationError``): a list of problems."""
    return RequestValidationError([{"loc": ("body",), "msg": message, "type": "value_error"}])


async def _bad_result(request: Request, exc: Exception) -> JSONResponse:
    return await request_validation_exception_handler(request, _unprocessable(str(exc)))


async def _http_error(request: Request, exc: Exception) -> Response:
    """``HTTPException(422, "message")`` answers like a validation error; other statuses as FastAPI does."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == status.HTTP_422_UNPROCESSABLE_CONTENT and isinstance(exc.detail, str):
        return await request_validation_exception_handler(request, _unprocessable(exc.detail))
    return await http_exception_handler(request, exc)


async def _request_invalid(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, with what it echoes of the request bounded and JSON-safe (NaN, huge inputs)."""
    assert isinstance(exc, RequestValidationError)
    return await request_validation_exception_handler(request, RequestValidationError(bounded_errors(exc.errors())))


async def _invalid_spec(request: Request, exc: Exception) -> JSONResponse:
    """Spec problems found against the world (files, tasks, methods), shaped like pydantic's."""
    assert isinstance(exc, InvalidSpec)
    errors = [{"loc": ("body", *p.loc), "msg": p.msg, "type": "value_error"} for p in exc.problems]
    return await request_validation_exception_handler(request, RequestValidationError(errors))


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
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(StaleLease, _stale_lease)
    app.add_exception_handler(BadResult, _bad_result)
    app.add_exception_handler(InvalidSpec, _invalid_spec)
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.include_router(api_router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(web.router)
    return app
