"""The dashboard end to end in a real headless browser (Debian's chromium driven by Playwright), on
the real API and Celery worker over PostgreSQL and Redis.

Needs: `apt-get install -y chromium` (the browser is /usr/bin/chromium, or $DPFT_TEST_CHROMIUM) and
`pip install playwright` (its own browser download is not used). Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from service.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SAMPLE = Path(str(resources.files("service.data") / "sample.jsonl"))
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = os.environ.get("DPFT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Long enough to be running however fast the machine is; the live test cancels it once it has seen
# the chart grow (and the fixture cancels it in any case), so its length costs no test time.
STEPS = 3000


def job_request(dataset_id: str, steps: int = STEPS) -> dict:
    return {
        "dataset_id": dataset_id,
        "base_model": "dpft/tiny-gpt2",
        "task": "causal_lm",
        "hyperparameters": {"max_steps": steps, "batch_size": 16, "learning_rate": 1e-2, "max_seq_length": 32},
        "lora": {"r": 4, "alpha": 8},
        "privacy": {"target_epsilon": 4.0, "max_grad_norm": 1.0},
    }


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("the dashboard's browser tests need Playwright for Python: pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    errors: list[str] = []
    elsewhere: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "request",
        lambda request: (
            None if request.url.startswith(("http://127.0.0.1:", "blob:", "data:")) else elsewhere.append(request.url)
        ),
    )
    page.set_default_timeout(15_000)
    yield page
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"
    assert not elsewhere, f"the dashboard loaded something from another origin: {elsewhere}"


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def sign_in(page, url: str, key: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{url}/dashboard/signin")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{url}/dashboard/")


@pytest.fixture(scope="module")
def tenant(postgres_stack) -> Iterator[dict]:  # type: ignore[no-untyped-def]
    """A tenant with a dataset (with an epsilon budget) and one job created."""
    key = postgres_stack.key("dash-a")
    with Client(postgres_stack.url, api_key=key) as client:
        dataset = client.upload_dataset(SAMPLE, name="support-tickets", epsilon_budget=12.0)
        job = client.create_job(job_request(dataset["id"]))
        yield {"key": key, "dataset": dataset, "job": job}
        if client.get_job(job["id"])["status"] in ("queued", "running"):
            client.cancel_job(job["id"])


def test_sign_in_with_a_wrong_key_fails_visibly(page, postgres_stack) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{postgres_stack.url}/dashboard/")
    page.wait_for_url("**/dashboard/signin**")  # no key in this session: sent to sign in
    page.get_by_label("API key").wait_for()
    shot(page, "signin")
    page.get_by_label("API key").fill("dpft_this-key-does-not-exist")
    page.get_by_role("button", name="Sign in").click()
    error = page.locator("#signin-error")
    error.filter(has_text="not accepted").wait_for()
    assert "401" in error.inner_text()
    assert page.get_by_label("API key").get_attribute("aria-invalid") == "true"
    assert "/dashboard/signin" in page.url
    assert page.evaluate("sessionStorage.getItem('dpft.apiKey')") is None
    shot(page, "signin-wrong-key")


def test_job_page_follows_the_job_live(page, postgres_stack, tenant) -> None:  # type: ignore[no-untyped-def]
    url, job_id = postgres_stack.url, tenant["job"]["id"]
    from playwright.sync_api import expect

    statuses: list[int] = []
    page.on("response", lambda r: statuses.append(r.status) if "/metrics?" in r.url else None)
    sign_in(page, url, tenant["key"])
    # the key is kept in this tab's sessionStorage only: no localStorage, no cookie
    assert page.evaluate("sessionStorage.getItem('dpft.apiKey')") == tenant["key"]
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []

    # The jobs table updates itself while the job runs.
    row = page.locator(f"#jobs-body tr[data-job-id='{job_id}']")
    progress = row.locator(".cell-progress .num")
    page.locator(f"#jobs-body tr[data-job-id='{job_id}'][data-status='running']").wait_for(timeout=90_000)
    expect(progress).not_to_have_text(f"0 / {STEPS:,}", timeout=90_000)  # the first steps are in
    first = progress.inner_text()
    expect(progress).not_to_have_text(first, timeout=20_000)  # and more follow without a reload
    page.get_by_role("link", name=job_id).click()
    page.wait_for_url(f"**/dashboard/jobs/{job_id}")
    chart = page.locator("#eps-chart")
    chart.wait_for()

    # Watch the epsilon chart while the job runs: the number of points it holds must grow.
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + 150
    shot_taken = False
    boxes_running = None
    while time.monotonic() < deadline:
        points = int(chart.get_attribute("data-points") or 0)
        status = page.locator("#job-status").get_attribute("data-status") if page.locator("#job-status").count() else ""
        seen.append((points, status or ""))
        if status == "running" and points >= 30 and not shot_taken:
            shot(page, "job-running")
            boxes_running = [page.locator(s).bounding_box() for s in ("#eps-chart", "#loss-chart", ".stats")]
            shot_taken = True
        if shot_taken and len({p for p, st in seen if st == "running" and p > 0}) >= 3:
            break  # the chart has grown while the job runs
        time.sleep(0.25)
    running = [p for p, st in seen if st == "running" and 0 < p < STEPS]
    assert len(set(running)) >= 3 and running == sorted(running), (
        f"the chart should gain points while the job runs: {seen[:: max(1, len(seen) // 40)]}"
    )

    # End the job; the page must follow it to its final state and show the API's numbers.
    with Client(url, api_key=tenant["key"]) as client:
        client.cancel_job(job_id)
        page.locator("main[data-final='true']").wait_for(timeout=60_000)
        final = client.get_job(job_id)
    assert final["status"] == "cancelled", final
    shown = page.locator("#eps-value").inner_text()
    assert shown == f"{final['epsilon']:.2f}"
    assert int(chart.get_attribute("data-points")) == final["step"] > 0
    assert page.locator("#step-value").inner_text() == f"{final['step']:,}"
    # planned curve, actual curve and target line are all drawn on the one chart
    for series in ("s-plan", "s-actual", "s-target"):
        assert page.locator(f"#eps-chart-svg path.{series}").get_attribute("d")
    assert "not covered by DP" in page.locator("#loss-chart").inner_text()
    assert int(page.locator("#loss-chart").get_attribute("data-points")) > 0
    plan = page.locator("#plan").inner_text()
    assert "Noise multiplier" in plan and "Clip norm" in plan and "Accountant" in plan
    assert page.locator("#events li[data-type='cancelled']").count() == 1
    assert page.locator("#cancel-job").is_hidden()
    boxes_final = [page.locator(s).bounding_box() for s in ("#eps-chart", "#loss-chart", ".stats")]
    assert boxes_final == boxes_running, "no layout jump while the data streams in and when the job ends"
    shot(page, "job")

    # Downsampling keeps a 100,000-step series to about 2,000 drawn points, quickly.
    drawn, ms = page.evaluate(
        """() => { const xs = [], ys = []; for (let i = 1; i <= 100000; i++) { xs.push(i); ys.push(Math.sqrt(i)); }
        const t0 = performance.now(); const d = window.dpftDashboard.downsample(xs, ys);
        return [d.xs.length, performance.now() - t0]; }"""
    )
    assert drawn <= 2001 and ms < 200, (drawn, ms)
    print(f"metrics polls: {statuses.count(200)} answered 200, {statuses.count(304)} answered 304")


def test_jobs_list_cancel_and_datasets(page, postgres_stack, tenant) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    url = postgres_stack.url
    with Client(url, api_key=tenant["key"]) as client:
        # a second job, short, that waits behind the first one (one worker) or runs: cancel it from the page
        second = client.create_job(job_request(tenant["dataset"]["id"], steps=400))
    sign_in(page, url, tenant["key"])
    rows = page.locator("#jobs-body tr")
    rows.first.wait_for()
    assert rows.count() == 2
    first_row = page.locator(f"#jobs-body tr[data-job-id='{tenant['job']['id']}']")
    assert "support-tickets" in first_row.inner_text()
    assert "dpft/tiny-gpt2" in first_row.inner_text()
    assert rows.first.get_attribute("data-job-id") == second["id"], "newest first"

    page.goto(f"{url}/dashboard/jobs/{second['id']}")
    page.on("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel-job:not([disabled])").click()
    page.locator("#job-status[data-status='cancelled'], #job-status[data-status='cancelling']").wait_for()
    page.locator("main[data-final='true']").wait_for(timeout=60_000)

    page.goto(f"{url}/dashboard/")
    page.locator(f"#jobs-body tr[data-job-id='{second['id']}'][data-status='cancelled']").wait_for()
    shot(page, "jobs")
    page.get_by_label("Status").select_option("running")
    expect(page.locator("#jobs-body tr")).to_have_count(0)
    page.get_by_label("Status").select_option("cancelled")
    expect(page.locator("#jobs-body tr")).to_have_count(2)  # both jobs of this tenant were cancelled
    assert "status=cancelled" in page.url

    page.get_by_role("link", name="Datasets").click()
    card = page.locator(f"[data-dataset-id='{tenant['dataset']['id']}']")
    card.locator("table").wait_for()
    text = card.inner_text()
    assert "12.00" in text and "support-tickets" in text
    assert tenant["job"]["id"] in text
    shot(page, "datasets")


def test_another_tenants_job_is_not_reachable(page, postgres_stack, tenant) -> None:  # type: ignore[no-untyped-def]
    url = postgres_stack.url
    sign_in(page, url, postgres_stack.key("dash-b"))
    page.locator("#jobs-empty").wait_for(state="visible")
    assert page.locator("#jobs-body tr").count() == 0
    page.goto(f"{url}/dashboard/jobs/{tenant['job']['id']}")
    page.locator("#not-found").wait_for()
    assert "Job not found" in page.locator("#not-found").inner_text()
    assert page.locator("#eps-chart").count() == 0
    shot(page, "job-other-tenant")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/dashboard/signin")
    assert page.evaluate("sessionStorage.length") == 0


def test_a_job_with_100000_steps_renders_quickly(browser) -> None:  # type: ignore[no-untyped-def]
    """The job page against a stand-in API (Playwright request routing) holding 100,000 steps: the
    page pages through the metrics with since_step and draws ~2,000 points per series, quickly."""
    import math

    static = Path(__file__).resolve().parents[2] / "service" / "dashboard" / "static"
    total = 100_000
    curve = [[s, 8.0 * math.sqrt(s / total)] for s in range(0, total + 1, 500)][1:]
    job = {
        "id": "job_5f0c1e2d3a4b5c6d7e8f9a0b",
        "object": "job",
        "status": "succeeded",
        "dataset_id": "ds_big",
        "base_model": "dpft/tiny-gpt2",
        "task": "causal_lm",
        "step": total,
        "total_steps": total,
        "epsilon": 8.0 * math.sqrt(1.0),
        "target_epsilon": 8.0,
        "plan": {
            "noise_multiplier": 0.9,
            "sampling_probability": 0.001,
            "steps": total,
            "epsilon": 8.0,
            "delta": 1e-6,
            "accountant": "prv",
            "fell_back": False,
            "num_units": 1_000_000,
            "curve": curve,
        },
        "hyperparameters": {"batch_size": 1000, "learning_rate": 5e-4, "max_steps": total},
        "lora": {"r": 8, "alpha": 16},
        "privacy": {"max_grad_norm": 1.0, "unit": "record", "accountant": "prv"},
        "stop_reason": "completed",
        "attempt": 1,
        "error": None,
        "metadata": {},
        "created_at": "2026-11-20T08:00:00Z",
        "started_at": "2026-11-20T08:00:05Z",
        "finished_at": "2026-11-21T02:10:00Z",
    }
    metric_requests: list[int] = []

    def handle(route, request) -> None:  # type: ignore[no-untyped-def]
        from urllib.parse import parse_qs, urlparse

        url = urlparse(request.url)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path.startswith("/dashboard/static/"):
            name = url.path.rsplit("/", 1)[1]
            types = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
            route.fulfill(body=(static / name).read_bytes(), content_type=types[name.rsplit(".", 1)[1]])
        elif url.path.startswith("/dashboard"):
            route.fulfill(body=(static / "index.html").read_bytes(), content_type="text/html")
        elif url.path == "/v1/jobs/job_5f0c1e2d3a4b5c6d7e8f9a0b":
            route.fulfill(json=job)
        elif url.path == "/v1/jobs/job_5f0c1e2d3a4b5c6d7e8f9a0b/metrics":
            since, limit = int(q.get("since_step", 0)), int(q.get("limit", 1000))
            metric_requests.append(since)
            steps = range(since + 1, min(total, since + limit) + 1)
            data = [
                {
                    "step": s,
                    "epsilon": 8.0 * math.sqrt(s / total),
                    "loss": 2 + 1 / math.sqrt(s) + (s % 7) / 100,
                    "learning_rate": 5e-4,
                    "timestamp": "2026-11-20T08:00:06Z",
                }
                for s in steps
            ]
            route.fulfill(
                json={
                    "object": "list",
                    "data": data,
                    "has_more": steps[-1] < total if data else False,
                    "next_since_step": steps[-1] if data else since,
                    "note": "loss is not covered",
                }
            )
        elif url.path.startswith("/v1/jobs/job_5f0c1e2d3a4b5c6d7e8f9a0b/"):
            route.fulfill(json={"object": "list", "data": [], "has_more": False})
        elif url.path == "/v1/jobs":
            route.fulfill(json={"object": "list", "data": [job], "has_more": False})
        elif url.path == "/v1/datasets":
            route.fulfill(json={"object": "list", "data": [{"id": "ds_big", "name": "big"}], "has_more": False})
        else:
            route.fulfill(status=404, json={"error": {"code": "not_found", "message": "no", "param": None}})

    context = browser.new_context(viewport={"width": 1280, "height": 800})  # a small laptop
    try:
        context.add_init_script("sessionStorage.setItem('dpft.apiKey', 'dpft_synthetic')")
        context.route("http://dashboard.test/**", handle)
        page = context.new_page()
        page.goto("http://dashboard.test/dashboard/jobs/job_5f0c1e2d3a4b5c6d7e8f9a0b")
        page.locator("main[data-final='true']").wait_for(timeout=60_000)
        assert page.locator("#eps-chart").get_attribute("data-points") == str(total)
        assert page.locator("#step-value").inner_text() == "100,000"
        assert page.locator("#eps-value").inner_text() == "8.00"
        assert metric_requests[:2] == [0, 10_000], "metrics are fetched incrementally with since_step"
        drawn = int(page.locator("#eps-chart-svg path.s-actual").get_attribute("data-drawn"))
        assert drawn <= 2002, drawn
        render_ms = float(page.locator("#eps-chart").get_attribute("data-render-ms"))
        assert render_ms < 250, f"drawing both charts from 100,000 points took {render_ms} ms"
        print(f"100,000-step job: both charts drawn in {render_ms} ms, {drawn} points in the epsilon path")
        shot(page, "job-100k-steps")
        page.goto("http://dashboard.test/dashboard/")
        page.locator("#jobs-body tr[data-job-id='job_5f0c1e2d3a4b5c6d7e8f9a0b']").wait_for()
        assert "100,000 / 100,000" in page.locator("#jobs-body tr").inner_text()
        table = page.locator("#jobs-table").bounding_box()
        assert table["x"] + table["width"] <= 1280, "the jobs table fits a 1280-pixel-wide screen"
        shot(page, "jobs-1280")
    finally:
        context.close()
