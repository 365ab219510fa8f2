"""The dashboard: static pages that read the JSON API; plotly.js comes from the plotly package."""

from pathlib import Path

import plotly
from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

WEB = Path(__file__).resolve().parent.parent / "web"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(WEB / "templates" / "index.html")


@router.get("/studies/{study_id}")
def study_page(study_id: int) -> FileResponse:
    return FileResponse(WEB / "templates" / "study.html")


@router.get("/static/plotly.min.js")
def plotly_js() -> FileResponse:
    if not PLOTLY_JS.exists():
        raise HTTPException(404, "plotly.min.js is not in the installed plotly package")
    return FileResponse(PLOTLY_JS, media_type="application/javascript")


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    path = (WEB / "static" / name).resolve()
    if path.parent != (WEB / "static").resolve() or not path.is_file():
        raise HTTPException(404, f"no static file '{name}'")
    return FileResponse(path)
