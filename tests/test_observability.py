"""GET /metrics from an API of several processes: every scrape shows the sum over all of them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from service import processes
from tests.conftest import create_key

pytestmark = pytest.mark.integration


def _count(text: str, route: str) -> float:
    pattern = rf'dpft_http_requests_total\{{method="GET",route="{re.escape(route)}",status="200"\}} (\S+)'
    return sum(float(value) for value in re.findall(pattern, text))


def test_every_scrape_of_a_multi_process_api_counts_all_its_requests(postgres_url: str, tmp_path: Path) -> None:
    env = {name: "" for name in os.environ if name.startswith("DPFT_")}
    env.update({"DPFT_DATABASE_URL": postgres_url, "DPFT_DATA_DIR": str(tmp_path)})
    key = create_key(postgres_url, "observability")
    port = processes.free_port()
    api = processes.start(processes.api_command("127.0.0.1", port, workers=2), env=env, log_path=tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    try:
        processes.wait_for_http(f"{url}/healthz", api)
        requests = 40
        for _ in range(requests):  # a new connection each time, so both processes answer some
            response = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200
        counts = [_count(httpx.get(f"{url}/metrics").text, "/v1/models") for _ in range(8)]
        assert counts == [requests] * 8, (counts, (tmp_path / "api.log").read_text()[-2000:])
    finally:
        processes.stop(api)
