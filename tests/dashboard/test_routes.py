"""The dashboard's routes without a browser: pages, assets, headers, and that nothing is loaded
from elsewhere (every asset ships in the package, so it works offline)."""

from __future__ import annotations

import re
from importlib import resources

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.dashboard import router
from service.errors import install_error_handlers

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    return TestClient(app)


@pytest.mark.parametrize(
    "path", ["/dashboard/", "/dashboard/jobs", "/dashboard/jobs/job_x", "/dashboard/datasets", "/dashboard/signin"]
)
def test_pages_are_the_shell_with_a_strict_csp(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/dashboard/static/app.js" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp


def test_bare_path_redirects_to_the_jobs_page(client: TestClient) -> None:
    r = client.get("/dashboard", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/dashboard/"


@pytest.mark.parametrize(
    ("name", "type_"),
    [("app.js", "text/javascript"), ("app.css", "text/css"), ("favicon.svg", "image/svg+xml")],
)
def test_assets_are_served_with_their_types(client: TestClient, name: str, type_: str) -> None:
    r = client.get(f"/dashboard/static/{name}")
    assert r.status_code == 200 and r.headers["content-type"].startswith(type_)


@pytest.mark.parametrize("name", ["nope.js", "..%2F__init__.py", "__init__.py", ".hidden.js"])
def test_unknown_assets_are_404_in_the_api_error_shape(client: TestClient, name: str) -> None:
    r = client.get(f"/dashboard/static/{name}")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_no_asset_loads_anything_from_another_origin() -> None:
    static = resources.files("service.dashboard") / "static"
    for entry in static.iterdir():
        text = entry.read_text()
        urls = re.findall(r"https?://[^\s\"')]+", text)
        # the SVG namespace is an identifier, not a download
        assert all(u.startswith("http://www.w3.org/2000/svg") for u in urls), (entry.name, urls)


def test_the_dashboard_is_not_in_the_openapi_document(client: TestClient) -> None:
    assert not any(p.startswith("/dashboard") for p in client.get("/openapi.json").json()["paths"])
