"""The privacy budget holds on the embedded default too (SQLite has no row locks)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import httpx
import pytest

from service.client import Client

pytestmark = pytest.mark.integration


def test_concurrent_job_creations_cannot_overspend_on_sqlite(embedded_stack) -> None:  # type: ignore[no-untyped-def]
    key = embedded_stack.key("budget")
    with Client(embedded_stack.url, api_key=key) as client:
        dataset = client.upload_dataset(str(resources.files("service.data") / "sample.jsonl"), epsilon_budget=10)
    body = {
        "dataset_id": dataset["id"],
        "base_model": "dpft/tiny-gpt2",
        "hyperparameters": {"max_steps": 2, "batch_size": 16},
        "privacy": {"target_epsilon": 4.0},
    }

    def create(_: int) -> int:
        response = httpx.post(
            f"{embedded_stack.url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        return response.status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = sorted(pool.map(create, range(6)))
    assert codes == [201, 201, 409, 409, 409, 409]
