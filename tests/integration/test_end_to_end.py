"""One DP fine-tuning job through the real stack: HTTP upload and job creation, a Celery worker
process training with DP-SGD, and per-step epsilon in the database, on both configurations."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import httpx
import pytest
from safetensors.numpy import load_file

from service.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SAMPLE = Path(str(resources.files("service.data") / "sample.jsonl"))


def job_request(dataset_id: str) -> dict:
    return {
        "dataset_id": dataset_id,
        "base_model": "dpft/tiny-gpt2",
        "task": "causal_lm",
        "hyperparameters": {"max_steps": 12, "batch_size": 16, "learning_rate": 1e-2, "max_seq_length": 32},
        "lora": {"r": 4, "alpha": 8},
        "privacy": {"target_epsilon": 4.0, "max_grad_norm": 1.0},
    }


@pytest.fixture(params=["postgres_stack", "embedded_stack"])
def stack(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return request.getfixturevalue(request.param)


def read_stream(stack, job_id: str, last_event_id: str | None = None) -> list[dict]:  # type: ignore[no-untyped-def]
    """Read the job's server-sent events until `end` (the job has ended, so the stream closes)."""
    headers = {"Authorization": f"Bearer {stack.key()}"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    messages, current = [], {}
    with httpx.stream("GET", f"{stack.url}/v1/jobs/{job_id}/stream", headers=headers, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if current:
                    messages.append(current)
                current = {}
            elif line.startswith("event: "):
                current["event"] = line[7:]
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
            elif line.startswith("id: "):
                current["id"] = line[4:]
    return messages


def test_job_trains_with_dp_and_records_epsilon_per_step(stack) -> None:  # type: ignore[no-untyped-def]
    with Client(stack.url, api_key=stack.key()) as client:
        dataset = client.upload_dataset(SAMPLE, name="sample")
        assert dataset["num_records"] == 400
        job = client.create_job(job_request(dataset["id"]))
        assert job["status"] == "queued"
        plan = job["plan"]
        assert plan["steps"] == 12 and plan["epsilon"] <= 4.0
        assert plan["sampling_probability"] == pytest.approx(16 / 400)

        final = client.wait(job["id"], timeout=240)
        assert final["status"] == "succeeded", (final, stack.log("worker"))
        points = client.all_metrics(job["id"])
        artifacts = {a["name"] for a in client.artifacts(job["id"])}
        report = client.download(job["id"], "privacy_report.json")
        events = [e["type"] for e in client.events(job["id"])]

    assert {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "privacy_report.json",
    } <= artifacts
    assert not any(name.startswith("checkpoints/") for name in artifacts)
    report = json.loads(report)
    assert report["epsilon"] == pytest.approx(final["epsilon"]) and report["steps_taken"] == plan["steps"]
    assert report["noise_multiplier"] == plan["noise_multiplier"] and report["unit"] == "record"
    assert events == ["created", "queued", "started", "succeeded"]

    steps = [p["step"] for p in points]
    assert steps == list(range(1, plan["steps"] + 1)), "one metrics row per noisy step, no gap"
    epsilons = [p["epsilon"] for p in points]
    assert all(b > a for a, b in zip(epsilons, epsilons[1:], strict=False)), "epsilon strictly increasing"
    assert epsilons[-1] <= 4.0
    assert final["epsilon"] == pytest.approx(epsilons[-1])
    assert final["epsilon"] == pytest.approx(plan["epsilon"]), "the run spends exactly what was planned"

    adapter_dir = stack.artifact_path(f"jobs/{job['id']}/adapter")
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert (adapter_dir / "adapter_config.json").exists()
    lora_b = {name: w for name, w in weights.items() if "lora_B" in name}
    assert lora_b, "the adapter holds LoRA weights"
    # PEFT initialises every lora_B to zero, so a nonzero lora_B is a LoRA weight that training changed.
    assert all(abs(w).max() > 0 for w in lora_b.values())
    assert not any(name.startswith("_module.") for name in weights), "no Opacus wrapper prefixes"

    streamed = read_stream(stack, job["id"])
    assert [int(m["data"]["step"]) for m in streamed if m["event"] == "metric"] == steps
    assert [m["data"]["type"] for m in streamed if m["event"] == "job_event"] == events
    assert streamed[-1]["event"] == "end"
    second_event_id = [m["data"]["id"] for m in streamed if m["event"] == "job_event"][1]
    resumed = read_stream(stack, job["id"], last_event_id=f"5-{second_event_id}")
    assert [m["data"]["step"] for m in resumed if m["event"] == "metric"] == steps[5:]
    assert [m["data"]["type"] for m in resumed if m["event"] == "job_event"] == events[2:]
