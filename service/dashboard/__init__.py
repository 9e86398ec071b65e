"""The web dashboard: static pages served under ``/dashboard`` that use the public API only.

Every asset ships in this package (no CDN, works offline). The pages are one small HTML shell and
one script; the script reads the API key from ``sessionStorage`` and calls ``/v1/...`` with it, so
the dashboard needs no server-side session and shows data platforms how to poll the API.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from service.errors import NotFound

router = APIRouter(prefix="/dashboard", include_in_schema=False)

_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
}
# The pages load nothing from elsewhere and run no inline script.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=32)
def _asset(name: str) -> bytes | None:
    if "/" in name or "\\" in name or name.startswith("."):
        return None
    entry = resources.files(__package__) / "static" / name
    if not entry.is_file():
        return None
    return entry.read_bytes()


def _page() -> Response:
    body = _asset("index.html")
    assert body is not None, "service/dashboard/static/index.html is missing from the package"
    return Response(body, media_type=_TYPES[".html"], headers=_HEADERS)


@router.get("")
def dashboard_root() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=307)


@router.get("/")
@router.get("/jobs")
@router.get("/jobs/{job_id}")
@router.get("/datasets")
@router.get("/signin")
def dashboard_page(job_id: str | None = None) -> Response:
    """Each page is the same shell; the script picks the view from the path."""
    return _page()


@router.get("/static/{name}")
def dashboard_asset(name: str) -> Response:
    suffix = name[name.rfind(".") :] if "." in name else ""
    body = _asset(name) if suffix in _TYPES else None
    if body is None:
        raise NotFound(f"No dashboard asset named {name!r}.")
    return Response(body, media_type=_TYPES[suffix], headers=_HEADERS)
