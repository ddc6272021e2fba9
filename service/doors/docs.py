"""Interactive API docs (``/docs``: Swagger UI, ``/redoc``: ReDoc) served from local files, so they work offline.

FastAPI's own docs pages load Swagger UI and ReDoc from a CDN: a blank page where the service has no internet
access. The same pages are built here with FastAPI's helpers, pointing at the copies of Swagger UI and ReDoc that the
``fastapi-offline`` package ships (MIT; Swagger UI under Apache 2.0), served under ``/docs-assets/``. Both pages
carry a Content-Security-Policy that lets the browser load nothing from elsewhere: ReDoc's bundle still asks for a
logo on Redocly's CDN, and the policy stops that request in the browser (the logo hides itself when it fails).
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

ASSETS = resources.files("fastapi_offline") / "static"
MEDIA_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}

# FastAPI's pages start the viewers with inline scripts and styles; ReDoc's search runs in a worker from a blob.
ONLY_THIS_SERVER = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:"
)

docs_router = APIRouter(include_in_schema=False)


def _url(request: Request, path: str) -> str:
    """``path`` under the app's root path (set when a proxy serves the app under a prefix)."""
    return request.scope.get("root_path", "").rstrip("/") + path


@docs_router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return _only_this_server(
        get_swagger_ui_html(
            openapi_url=_url(request, "/openapi.json"),
            title=f"{request.app.title} - Swagger UI",
            swagger_js_url=_url(request, "/docs-assets/swagger-ui-bundle.js"),
            swagger_css_url=_url(request, "/docs-assets/swagger-ui.css"),
            swagger_favicon_url=_url(request, "/docs-assets/favicon.png"),
        )
    )


@docs_router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return _only_this_server(
        get_redoc_html(
            openapi_url=_url(request, "/openapi.json"),
            title=f"{request.app.title} - ReDoc",
            redoc_js_url=_url(request, "/docs-assets/redoc.standalone.js"),
            redoc_favicon_url=_url(request, "/docs-assets/favicon.png"),
            with_google_fonts=False,
        )
    )


def _only_this_server(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = ONLY_THIS_SERVER
    return page


@docs_router.get("/docs-assets/{name}")
async def asset(name: str) -> Response:
    """One of the files the docs pages load; nothing else is served from here."""
    if name not in MEDIA_TYPES:
        raise HTTPException(404, "Not Found")
    return Response(_read(name), media_type=MEDIA_TYPES[name], headers={"Cache-Control": "public, max-age=86400"})


@functools.cache
def _read(name: str) -> bytes:
    return (ASSETS / name).read_bytes()
