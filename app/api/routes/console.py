"""The web console: one static page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import HTMLResponse

router = APIRouter(tags=["console"])

STATIC = Path(__file__).resolve().parents[2] / "static"


@router.get("/", summary="Web console", response_class=HTMLResponse)
async def console() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(), headers={"Cache-Control": "no-cache"})
