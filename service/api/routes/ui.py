"""``GET /ui``: the playground (``service/ui``: one static page, its script and style, example images).

The page holds no data of its own: everything it shows comes from the API (``/v1/models``,
``/v1/interventions``, ``/v1/chat/completions`` with ``"diagnostics": true``, ``/v1/evaluations``), called with the
API key typed into the page when the server has keys. Nothing is fetched from outside the server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parents[2] / "ui"
router = APIRouter(include_in_schema=False)


@router.get("/ui")
async def playground() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/ui/examples")
async def examples() -> list[str]:
    """The shipped example images, as paths under ``/ui/static``."""
    return [f"/ui/static/examples/{p.name}" for p in sorted((UI_DIR / "examples").glob("*.png"))]


def static_files() -> StaticFiles:
    return StaticFiles(directory=UI_DIR)
