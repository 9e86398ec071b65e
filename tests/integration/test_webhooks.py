"""Webhooks against a receiver on 127.0.0.1: signed with HMAC, retried with backoff until accepted."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

import pytest

from service.client import Client
from service.webhooks import SIGNATURE_HEADER, verify

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Receiver(BaseHTTPRequestHandler):
    """Answers 500 to the first `failures` requests, then 200; keeps what it was sent."""

    failures = 2
    received: list[tuple[int, dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = 500 if len(self.received) < self.failures else 200
        self.received.append((status, dict(self.headers), body))
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/dpft"
    server.shutdown()


def test_terminal_state_is_posted_signed_and_retried(postgres_stack, receiver: str) -> None:  # type: ignore[no-untyped-def]
    sample = resources.files("service.data") / "sample.jsonl"
    with Client(postgres_stack.url, api_key=postgres_stack.key("hooks")) as client:
        dataset = client.upload_dataset(str(sample))
        job = client.create_job(
            {
                "dataset_id": dataset["id"],
                "base_model": "dpft/tiny-gpt2",
                "hyperparameters": {"max_steps": 4, "batch_size": 16, "max_seq_length": 32},
                "privacy": {"target_epsilon": 2.0},
                "webhook_url": receiver,
            }
        )
        assert client.wait(job["id"], timeout=180)["status"] == "succeeded"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(status == 200 for status, _, _ in Receiver.received):
            time.sleep(0.2)
        events = [e["type"] for e in client.events(job["id"])]

    assert [status for status, _, _ in Receiver.received] == [500, 500, 200]
    assert events[-3:] == ["webhook_attempt_failed", "webhook_attempt_failed", "webhook_delivered"]
    _, headers, body = Receiver.received[-1]
    secret = postgres_stack.env["DPFT_WEBHOOK_SECRET"]
    assert verify(secret, headers[SIGNATURE_HEADER], body)
    assert not verify("another-secret", headers[SIGNATURE_HEADER], body)
    assert not verify(secret, headers[SIGNATURE_HEADER], body.replace(b"succeeded", b"failed"))
    payload = json.loads(body)
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job["id"]
    assert payload["data"]["epsilon"] <= 2.0
