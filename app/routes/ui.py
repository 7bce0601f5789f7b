"""GET /: the browser UI, plain HTML and JavaScript from ``app/static/`` (no build step, no external assets)."""

from __future__ import annotations

import html
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["ui"])
# The page loads its own script and style only, shows uploads and downloads as blob: URLs, and is not to be framed.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load: a browser kept an upgraded service's page and script for days otherwise
    # (heuristic freshness from the files' age), and ran the old script against the new API.
    "Cache-Control": "no-cache",
}
# The page's own URLs (its script, style and links), written with the service's root path (uvicorn
# --root-path behind a proxy's path prefix); the script reads the same prefix from the meta tag.
ROOT_URLS = re.compile(r'(href|src)="/(?!/)')


def page(root_path: str) -> str:
    """index.html with its URLs under ``root_path`` ("" or "/prefix") and that prefix in a meta tag."""
    root = html.escape(root_path.rstrip("/"), quote=True)
    text = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    text = ROOT_URLS.sub(lambda m: f'{m[1]}="{root}/', text)
    charset = '<meta charset="utf-8">'
    return text.replace(charset, f'{charset}\n  <meta name="sglora-root" content="{root}">', 1)


@router.get("/", include_in_schema=False)
async def index(request: Request) -> HTMLResponse:
    """The page: describe a task, see the chosen experts, download the LoRA, compare retrieval with and without it."""
    return HTMLResponse(page(request.scope.get("root_path", "")), headers=PAGE_HEADERS)


class UiStaticFiles(StaticFiles):
    """The page's script and style, revalidated on every load (see PAGE_HEADERS)."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


router.add_api_route("/", index, methods=["HEAD"], include_in_schema=False)
