"""GET /: the browser UI, plain HTML and JavaScript from ``app/static/`` (no build step, no external assets)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["ui"])
# The page loads its own script and style only, shows uploads and downloads as blob: URLs, and is not to be framed.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The page: describe a task, see the chosen experts, download the LoRA, compare retrieval with and without it."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


router.add_api_route("/", index, methods=["HEAD"], include_in_schema=False)
