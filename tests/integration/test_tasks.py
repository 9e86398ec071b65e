"""The service drives every task, model family and privacy unit the engine offers (the glue between
the job spec and the engine: labels, entity columns, full fine-tuning)."""

from __future__ import annotations

from importlib import resources

import pytest

from service.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SAMPLE = str(resources.files("service.data") / "sample.jsonl")

CASES = {
    "llama-lora-entity": (
        {"entity_column": "user_id"},
        {
            "base_model": "dpft/tiny-llama",
            "task": "causal_lm",
            "privacy": {"target_epsilon": 3.0, "unit": "entity", "entity_column": "user_id"},
        },
    ),
    "bert-classification-full": (
        {"label_field": "label"},
        {
            "base_model": "dpft/tiny-bert",
            "task": "sequence_classification",
            "lora": None,
            "privacy": {"target_epsilon": 3.0, "accountant": "rdp"},
        },
    ),
    "gpt2-micro-batches": (
        {},
        {
            "base_model": "dpft/tiny-gpt2",
            "task": "causal_lm",
            "hyperparameters": {"max_steps": 6, "batch_size": 16, "micro_batch_size": 4, "max_seq_length": 32},
            "privacy": {"target_epsilon": 3.0},
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_job_kinds_train_to_their_plan(postgres_stack, case: str) -> None:  # type: ignore[no-untyped-def]
    upload_fields, request = CASES[case]
    with Client(postgres_stack.url, api_key=postgres_stack.key("tasks")) as client:
        dataset = client.upload_dataset(SAMPLE, **upload_fields)
        body = {
            "dataset_id": dataset["id"],
            "hyperparameters": {"max_steps": 6, "batch_size": 8, "max_seq_length": 32},
            **request,
        }
        job = client.create_job(body)
        final = client.wait(job["id"], timeout=180)
        assert final["status"] == "succeeded", (final["error"], postgres_stack.log("worker"))
        points = client.all_metrics(job["id"])
        artifacts = {a["name"] for a in client.artifacts(job["id"])}
    assert [p["step"] for p in points] == list(range(1, 7))
    assert final["epsilon"] == pytest.approx(job["plan"]["epsilon"]) and final["epsilon"] <= 3.0
    if request.get("lora", {}) is None:
        assert "adapter/adapter_config.json" not in artifacts, "a full fine-tune saves the model, not an adapter"
    else:
        assert "adapter/adapter_model.safetensors" in artifacts
    if case == "llama-lora-entity":
        assert job["plan"]["sampling_probability"] == pytest.approx(8 / dataset["num_entities"])
