"""A small Python client for the dpft HTTP API.

from service.client import Client
client = Client("http://127.0.0.1:8000", api_key="dpft_...")
dataset = client.upload_dataset("train.jsonl")
job = client.create_job({"dataset_id": dataset["id"], "base_model": "dpft/tiny-gpt2",
                         "privacy": {"target_epsilon": 8}})
for job in client.follow(job["id"]): print(job["step"], job["epsilon"])
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from service.settings import get_settings

TERMINAL = ("succeeded", "failed", "cancelled")


class APIError(Exception):
    """An error answer from the API, with its code and the message meant for a person."""

    def __init__(self, status_code: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code, self.code, self.message, self.param = status_code, code, message, param


class Client:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        settings = get_settings()
        key = api_key or settings.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=base_url or settings.api_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            self._raise(response)
        return response.json()

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        try:
            error = response.json()["error"]
        except Exception:
            error = {"code": "error", "message": response.text}
        raise APIError(response.status_code, error.get("code", "error"), error.get("message", ""), error.get("param"))

    def upload_dataset(self, path: str | Path, **fields: Any) -> dict[str, Any]:
        path = Path(path)
        data = {k: str(v) for k, v in fields.items() if v is not None}
        with path.open("rb") as handle:
            return self._request("POST", "/v1/datasets", files={"file": (path.name, handle)}, data=data)

    def list_datasets(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/datasets")["data"]

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/datasets/{dataset_id}")

    def create_job(self, request: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=request, headers=headers)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def metrics(self, job_id: str, since_step: int = 0, limit: int = 1000) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}/metrics", params={"since_step": since_step, "limit": limit})

    def all_metrics(self, job_id: str) -> list[dict[str, Any]]:
        points: list[dict[str, Any]] = []
        since = 0
        while True:
            page = self.metrics(job_id, since_step=since)
            points.extend(page["data"])
            since = page["next_since_step"]
            if not page["has_more"]:
                return points

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/jobs/{job_id}/events", params={"limit": 1000})["data"]

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/jobs/{job_id}/artifacts")["data"]

    def download(self, job_id: str, name: str) -> bytes:
        response = self._http.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        if response.status_code >= 400:
            self._raise(response)
        return response.content

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def list_jobs(self, **filters: Any) -> dict[str, Any]:
        return self._request("GET", "/v1/jobs", params={k: v for k, v in filters.items() if v is not None})

    def plan(self, **spec: Any) -> dict[str, Any]:
        return self._request("POST", "/v1/privacy/plan", json={k: v for k, v in spec.items() if v is not None})

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models")["data"]

    def follow(self, job_id: str, interval: float = 0.5, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield the job each time it is polled, until it reaches a terminal state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            yield job
            if job["status"] in TERMINAL:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(interval)

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        *_, last = self.follow(job_id, timeout=timeout)
        return last
