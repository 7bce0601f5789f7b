"""GET /: the browser UI, plain HTML and JavaScript from ``app/static/`` (no build step, no external assets)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["ui"])


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The page: describe a task, see the chosen experts, download the LoRA, compare retrieval with and without it."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
