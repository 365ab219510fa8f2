"""The dashboard: static pages that read the JSON API with the session cookie.

Logging in checks a token and keeps it in an HttpOnly, SameSite=Strict cookie, which the API
accepts in place of the Bearer header; plotly.js comes from the installed plotly package.
"""

from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, quote

import plotly
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from service import auth
from service.deps import SESSION_COOKIE, ServicesDep, StudyId

WEB = Path(__file__).resolve().parent.parent / "web"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
_COOKIE_DAYS = 30

router = APIRouter(include_in_schema=False)


def _logged_in(request: Request, services: ServicesDep) -> auth.Principal | None:
    secret = request.cookies.get(SESSION_COOKIE)
    if not secret:
        return None
    with services.sessions() as session:
        principal = auth.authenticate(session, secret)
    return principal if principal is not None and not principal.is_pool else None


LoggedIn = Annotated[auth.Principal | None, Depends(_logged_in)]


def _page(name: str, who: auth.Principal | None, request: Request) -> Response:
    if who is None:
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
    return FileResponse(WEB / "templates" / name, headers={"Cache-Control": "no-store"})


def _login_page(error: str = "", next_path: str = "/", status: int = 200) -> HTMLResponse:
    html = (WEB / "templates" / "login.html").read_text()
    html = html.replace("{{error}}", error).replace("{{next}}", quote(next_path, safe="/"))
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def _safe_next(value: str) -> str:
    """Only paths of this site: never redirect a login to another origin."""
    return value if value.startswith("/") and not value.startswith("//") else "/"


@router.get("/login")
def login_page(next: str = "/") -> HTMLResponse:
    return _login_page(next_path=_safe_next(next))


@router.post("/login")
async def login(request: Request, services: ServicesDep) -> Response:
    form = parse_qs((await request.body()).decode(errors="replace"))
    token = form.get("token", [""])[0].strip()
    next_path = _safe_next(form.get("next", ["/"])[0])
    with services.sessions() as session:
        principal = auth.authenticate(session, token)
    if principal is None or principal.is_pool:
        why = "That token is not valid (or was revoked)." if principal is None else \
            "A worker-pool token cannot open the dashboard: use a team's token."
        return _login_page(why, next_path, status=401)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(SESSION_COOKIE, token, max_age=_COOKIE_DAYS * 86400, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/")
def index(request: Request, who: LoggedIn) -> Response:
    return _page("index.html", who, request)


@router.get("/studies/{study_id}")
def study_page(study_id: StudyId, request: Request, who: LoggedIn) -> Response:
    return _page("study.html", who, request)


@router.get("/workers")
def workers_page(request: Request, who: LoggedIn) -> Response:
    return _page("workers.html", who, request)


@router.get("/static/plotly.min.js")
def plotly_js() -> FileResponse:
    if not PLOTLY_JS.exists():
        raise HTTPException(404, "plotly.min.js is not in the installed plotly package")
    return FileResponse(PLOTLY_JS, media_type="application/javascript", headers={"Cache-Control": "max-age=86400"})


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    path = (WEB / "static" / name).resolve()
    if path.parent != (WEB / "static").resolve() or not path.is_file():
        raise HTTPException(404, f"no static file '{name}'")
    return FileResponse(path)
