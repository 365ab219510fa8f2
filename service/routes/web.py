"""The dashboard: static pages that read the JSON API with the session cookie.

Logging in checks a token and opens a server-side session (``auth.open_web_session``); the
HttpOnly, SameSite=Strict cookie holds the session's random id, never the token, and logging
out revokes it. The API accepts the cookie in place of the Bearer header; its unsafe requests
must come from this origin with the page's CSRF token (``deps.check_csrf``), which each page
carries in ``<meta name="mmmo-csrf">`` and ``mmmo.js`` sends as ``X-CSRF-Token``. plotly.js
comes from the installed plotly package.
"""

from dataclasses import dataclass
from datetime import timedelta
from html import escape
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, quote

import plotly
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from service import auth
from service.deps import SESSION_COOKIE, ServicesDep, StudyId, check_csrf, same_origin

WEB = Path(__file__).resolve().parent.parent / "web"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
SESSION_LIFETIME = timedelta(days=30)

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class Visitor:
    principal: auth.Principal
    csrf: str  # the session's CSRF token, written into each page


def _logged_in(request: Request, services: ServicesDep) -> Visitor | None:
    secret = request.cookies.get(SESSION_COOKIE)
    if not secret:
        return None
    with services.sessions() as session:
        principal = auth.web_principal(session, secret, services.clock())
    return Visitor(principal, auth.csrf_token(secret)) if principal is not None else None


LoggedIn = Annotated[Visitor | None, Depends(_logged_in)]


def _page(name: str, who: Visitor | None, request: Request) -> Response:
    if who is None:
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
    html = (WEB / "templates" / name).read_text().replace("{{csrf}}", escape(who.csrf))
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


def _login_page(error: str = "", next_path: str = "/", status: int = 200) -> HTMLResponse:
    html = (WEB / "templates" / "login.html").read_text()
    html = html.replace("{{error}}", error).replace("{{next}}", quote(next_path, safe="/"))
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def _safe_next(value: str) -> str:
    """Only paths of this site: never redirect a login to another origin."""
    return value if value.startswith("/") and not value.startswith("//") else "/"


def _cookie_attributes(request: Request, services: ServicesDep) -> dict:
    secure = services.settings.secure_cookies or request.url.scheme == "https"
    return {"httponly": True, "samesite": "strict", "secure": secure, "path": "/"}


def _from_elsewhere(request: Request, secure: bool) -> bool:
    """A login posted by another origin's page (login CSRF would sign the visitor in as someone
    else). Scripts, which send neither header, may log in: they hold the token anyway."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    return "origin" in request.headers and not same_origin(request, secure)


@router.get("/login")
def login_page(next: str = "/") -> HTMLResponse:
    return _login_page(next_path=_safe_next(next))


@router.post("/login")
async def login(request: Request, services: ServicesDep) -> Response:
    form = parse_qs((await request.body()).decode(errors="replace"))
    token = form.get("token", [""])[0].strip()
    next_path = _safe_next(form.get("next", ["/"])[0])
    if _from_elsewhere(request, services.settings.secure_cookies):
        return _login_page("Log in from this site's own login page.", next_path, status=403)
    with services.sessions() as session:
        principal = auth.authenticate(session, token)
        if principal is None or principal.is_pool:
            why = "That token is not valid (or was revoked)." if principal is None else \
                "A worker-pool token cannot open the dashboard: use a team's token."
            return _login_page(why, next_path, status=401)
        secret = auth.open_web_session(session, principal, services.clock(), SESSION_LIFETIME)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(SESSION_COOKIE, secret, max_age=int(SESSION_LIFETIME.total_seconds()),
                        **_cookie_attributes(request, services))
    return response


@router.post("/logout")
async def logout(request: Request, services: ServicesDep) -> Response:
    """End the session (its id opens nothing from now on): a form of the dashboard's own pages."""
    secret = request.cookies.get(SESSION_COOKIE)
    if secret:
        form = parse_qs((await request.body()).decode(errors="replace"))
        check_csrf(request, secret, form.get("csrf", [""])[0], services.settings.secure_cookies)
        with services.sessions() as session:
            auth.close_web_session(session, secret, services.clock())
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, **_cookie_attributes(request, services))
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
