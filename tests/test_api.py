"""The HTTP API in-process (FastAPI's TestClient) on the real PostgreSQL: authentication, dataset
validation, job creation errors and tenant isolation. Training is covered by tests/integration."""

from __future__ import annotations

import json
from importlib import resources

import pytest

pytestmark = pytest.mark.integration

SAMPLE = (resources.files("service.data") / "sample.jsonl").read_bytes()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(api, key: str, content: bytes = SAMPLE, filename: str = "data.jsonl", **fields):  # type: ignore[no-untyped-def]
    return api.post(
        "/v1/datasets",
        headers=auth(key),
        files={"file": (filename, content)},
        data={k: str(v) for k, v in fields.items()},
    )


@pytest.fixture(scope="module")
def dataset(api, tenant_key: str) -> dict:  # type: ignore[no-untyped-def]
    response = upload(api, tenant_key, entity_column="user_id", label_field="label")
    assert response.status_code == 201, response.text
    return response.json()


def job_body(dataset_id: str, **privacy) -> dict:  # type: ignore[no-untyped-def]
    return {
        "dataset_id": dataset_id,
        "base_model": "dpft/tiny-gpt2",
        "hyperparameters": {"epochs": 1, "batch_size": 16},
        "privacy": {"target_epsilon": 8.0, **privacy},
    }


def test_health_and_readiness(api) -> None:  # type: ignore[no-untyped-def]
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}])
def test_requests_without_a_valid_key_are_401(api, headers) -> None:  # type: ignore[no-untyped-def]
    response = api.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


def test_models_lists_the_builtin_presets(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    models = {m["id"]: m for m in api.get("/v1/models", headers=auth(tenant_key)).json()["data"]}
    assert {"dpft/tiny-gpt2", "dpft/tiny-llama", "dpft/tiny-bert"} <= set(models)
    assert models["dpft/tiny-gpt2"]["builtin"] is True


def test_upload_counts_records_entities_and_columns(dataset: dict) -> None:
    assert dataset["num_records"] == 400
    assert dataset["num_entities"] == len({json.loads(line)["user_id"] for line in SAMPLE.splitlines()})
    assert dataset["columns"] == ["text", "label", "user_id"]
    assert len(dataset["content_hash"]) == 64


@pytest.mark.parametrize(
    ("content", "fields", "message", "param"),
    [
        (b'{"text": "ok"}\n{"text": broken\n', {}, "line 2 is not valid JSON", "file"),
        (b'{"body": "no text field"}\n', {}, "line 1 has no non-empty string field 'text'", "text_field"),
        (b"", {}, "no records", "file"),
        (b'{"text": "caf\xe9"}\n', {}, "line 1 is not UTF-8", "file"),
        (b'{"text": "a"}\n', {"entity_column": "user"}, "line 1 has no entity id in 'user'", "entity_column"),
        (b'{"text": "a"}\n', {"label_field": "label"}, "line 1 has no label in 'label'", "label_field"),
        (b"[1, 2]\n", {}, "line 1 is not a JSON object", "file"),
        (b'{"text": "' + b"x" * 200_001 + b'"}\n', {}, "over DPFT_MAX_RECORD_CHARS", "file"),
    ],
)
def test_invalid_datasets_are_422_with_the_position_and_stored_nowhere(
    api,
    tenant_key: str,
    api_env: dict,
    content: bytes,
    fields: dict,
    message: str,
    param: str,  # type: ignore[no-untyped-def]
) -> None:
    from pathlib import Path

    before = sorted(Path(api_env["DPFT_ARTIFACT_DIR"]).rglob("*"))
    response = upload(api, tenant_key, content, **fields)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param
    assert sorted(Path(api_env["DPFT_ARTIFACT_DIR"]).rglob("*")) == before


def test_a_dataset_report_lists_every_problem_with_its_line(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    lines = [b'{"text": "fine"}', b"{broken", b'{"text": ""}', b'{"text": "fine"}', b"[]"] + [b"{x"] * 30
    error = upload(api, tenant_key, b"\n".join(lines)).json()["error"]
    assert error["details"][:3] == [
        "line 2 is not valid JSON: Expecting property name enclosed in double quotes (column 2)",
        "line 3 has no non-empty string field 'text'",
        "line 5 is not a JSON object",
    ]
    assert len(error["details"]) == 20 and "(and 15 more)" in error["message"]


def test_upload_over_the_size_limit_is_413(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    response = upload(api, tenant_key, b'{"text": "x"}\n' * 30_000)
    assert response.status_code == 413
    assert "DPFT_MAX_UPLOAD_BYTES" in response.json()["error"]["message"]


def test_job_creation_solves_the_plan_and_stores_a_queued_job(api, tenant_key: str, dataset: dict) -> None:  # type: ignore[no-untyped-def]
    response = api.post("/v1/jobs", headers=auth(tenant_key), json=job_body(dataset["id"]))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and job["object"] == "job"
    assert job["plan"]["epsilon"] <= 8.0
    assert job["plan"]["sampling_probability"] == pytest.approx(16 / 400)
    assert job["total_steps"] == job["plan"]["steps"] == 25
    assert api.get(f"/v1/jobs/{job['id']}", headers=auth(tenant_key)).json()["id"] == job["id"]


def test_entity_level_jobs_count_entities(api, tenant_key: str, dataset: dict) -> None:  # type: ignore[no-untyped-def]
    body = job_body(dataset["id"], unit="entity", entity_column="user_id")
    job = api.post("/v1/jobs", headers=auth(tenant_key), json=body).json()
    assert job["plan"]["sampling_probability"] == pytest.approx(16 / dataset["num_entities"])


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"privacy": {"target_epsilon": -1}}, 422, "invalid_request"),
        ({"privacy": {}}, 422, "invalid_request"),
        ({"privacy": {"target_epsilon": 1e-6}}, 422, "infeasible_privacy_spec"),
        ({"privacy": {"target_epsilon": 8, "target_delta": 0.5}}, 422, "infeasible_privacy_spec"),
        ({"hyperparameters": {"batch_size": 100_000}}, 422, "infeasible_privacy_spec"),
        ({"hyperparameters": {"max_steps": 0}}, 422, "invalid_request"),
        ({"base_model": "someone/unknown-model"}, 422, "invalid_request"),
        ({"dataset_id": "ds_missing"}, 404, "not_found"),
        ({"task": "sequence_classification", "dataset_id": None}, 422, "invalid_request"),
    ],
)
def test_bad_job_requests_get_a_clear_4xx(api, tenant_key: str, dataset: dict, change, status, code) -> None:  # type: ignore[no-untyped-def]
    body = job_body(dataset["id"])
    for key, value in change.items():
        body[key] = value
    response = api.post("/v1/jobs", headers=auth(tenant_key), json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_non_finite_numbers_are_422(api, tenant_key: str, dataset: dict) -> None:  # type: ignore[no-untyped-def]
    raw = json.dumps(job_body(dataset["id"])).replace("8.0", "NaN")
    response = api.post("/v1/jobs", headers={**auth(tenant_key), "Content-Type": "application/json"}, content=raw)
    assert response.status_code == 422


def test_other_tenants_objects_are_404_in_every_endpoint(
    api, tenant_key: str, other_tenant_key: str, dataset: dict
) -> None:  # type: ignore[no-untyped-def]
    job = api.post("/v1/jobs", headers=auth(tenant_key), json=job_body(dataset["id"])).json()
    other = auth(other_tenant_key)
    ds, jb = dataset["id"], job["id"]
    requests = [
        ("GET", f"/v1/datasets/{ds}", None),
        ("PATCH", f"/v1/datasets/{ds}", {"name": "mine now"}),
        ("DELETE", f"/v1/datasets/{ds}", None),
        ("GET", f"/v1/datasets/{ds}/ledger", None),
        ("POST", "/v1/jobs", job_body(ds)),
        ("POST", "/v1/privacy/plan", {"dataset_id": ds, "batch_size": 8, "max_steps": 10, "noise_multiplier": 1.0}),
        ("GET", f"/v1/jobs/{jb}", None),
        ("POST", f"/v1/jobs/{jb}/cancel", None),
        ("GET", f"/v1/jobs/{jb}/metrics", None),
        ("GET", f"/v1/jobs/{jb}/events", None),
        ("GET", f"/v1/jobs/{jb}/stream", None),
        ("GET", f"/v1/jobs/{jb}/artifacts", None),
        ("GET", f"/v1/jobs/{jb}/artifacts/privacy_report.json", None),
    ]
    for method, path, body in requests:
        response = api.request(method, path, headers=other, json=body)
        assert response.status_code == 404, (method, path, response.status_code)
        assert response.json()["error"]["code"] == "not_found"
    assert jb not in {j["id"] for j in api.get("/v1/jobs", headers=other).json()["data"]}
    assert ds not in {d["id"] for d in api.get("/v1/datasets", headers=other).json()["data"]}
    assert api.get(f"/v1/jobs/{jb}", headers=auth(tenant_key)).json()["status"] == "queued", "nothing changed"


def test_idempotency_key_returns_the_same_job(api, tenant_key: str, dataset: dict) -> None:  # type: ignore[no-untyped-def]
    headers = {**auth(tenant_key), "Idempotency-Key": "same-key-1"}
    first = api.post("/v1/jobs", headers=headers, json=job_body(dataset["id"]))
    second = api.post("/v1/jobs", headers=headers, json=job_body(dataset["id"]))
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    changed = api.post("/v1/jobs", headers=headers, json=job_body(dataset["id"], target_epsilon=4.0))
    assert changed.status_code == 422


def test_dataset_budget_refuses_a_job_that_would_overspend(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    ds = upload(api, tenant_key, epsilon_budget=10).json()
    assert api.post("/v1/jobs", headers=auth(tenant_key), json=job_body(ds["id"])).status_code == 201
    response = api.post("/v1/jobs", headers=auth(tenant_key), json=job_body(ds["id"]))
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "privacy_budget_exceeded" and "left" in error["message"]


def test_cancel_a_queued_job_at_once_and_release_its_reservation(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    ds = upload(api, tenant_key, epsilon_budget=10).json()
    job = api.post("/v1/jobs", headers=auth(tenant_key), json=job_body(ds["id"])).json()
    reserved = api.get(f"/v1/datasets/{ds['id']}", headers=auth(tenant_key)).json()["epsilon_spent"]
    assert reserved == pytest.approx(job["plan"]["epsilon"])
    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(tenant_key))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert api.get(f"/v1/datasets/{ds['id']}", headers=auth(tenant_key)).json()["epsilon_spent"] == 0
    again = api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(tenant_key))
    assert again.status_code == 409
    events = api.get(f"/v1/jobs/{job['id']}/events", headers=auth(tenant_key)).json()["data"]
    assert [e["type"] for e in events] == ["created", "queued", "cancelled"]


def test_list_jobs_pages_newest_first_and_filters(api, tenant_key: str, dataset: dict) -> None:  # type: ignore[no-untyped-def]
    ids = [api.post("/v1/jobs", headers=auth(tenant_key), json=job_body(dataset["id"])).json()["id"] for _ in range(3)]
    first = api.get("/v1/jobs", headers=auth(tenant_key), params={"limit": 2, "dataset_id": dataset["id"]}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    second = api.get(
        "/v1/jobs",
        headers=auth(tenant_key),
        params={"limit": 2, "dataset_id": dataset["id"], "after": first["data"][-1]["id"]},
    ).json()
    assert second["data"][0]["id"] == ids[0]
    queued = api.get("/v1/jobs", headers=auth(tenant_key), params={"status": "queued", "limit": 100}).json()["data"]
    assert all(j["status"] == "queued" for j in queued)
    assert api.get("/v1/jobs", headers=auth(tenant_key), params={"status": "bogus"}).status_code == 422


def test_plan_solves_a_spec_and_reports_the_curve(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    body = {"num_records": 10_000, "batch_size": 100, "epochs": 3, "target_epsilon": 3.0}
    plan = api.post("/v1/privacy/plan", headers=auth(tenant_key), json=body).json()
    assert plan["steps"] == 300 and plan["sampling_probability"] == pytest.approx(0.01)
    assert plan["epsilon"] <= 3.0 and plan["accountant"] == "prv" and not plan["fell_back"]
    assert plan["delta"] < 1 / 10_000
    assert plan["curve"][-1] == [300, pytest.approx(plan["epsilon"])]
    assert 2 <= len(plan["curve"]) <= 200
    reported = api.post(
        "/v1/privacy/plan",
        headers=auth(tenant_key),
        json={**body, "target_epsilon": None, "noise_multiplier": plan["noise_multiplier"]},
    ).json()
    assert reported["epsilon"] == pytest.approx(plan["epsilon"])


def test_plan_counts_a_datasets_units(api, tenant_key: str, dataset: dict) -> None:  # type: ignore[no-untyped-def]
    base = {"dataset_id": dataset["id"], "batch_size": 10, "max_steps": 50, "noise_multiplier": 1.0}
    records = api.post("/v1/privacy/plan", headers=auth(tenant_key), json=base).json()
    entities = api.post("/v1/privacy/plan", headers=auth(tenant_key), json={**base, "entity_column": "user_id"}).json()
    assert records["sampling_probability"] == pytest.approx(10 / 400)
    assert entities["sampling_probability"] == pytest.approx(10 / dataset["num_entities"])
    other = api.post("/v1/privacy/plan", headers=auth(tenant_key), json={**base, "entity_column": "label"})
    assert other.status_code == 422 and "entity_column" in other.json()["error"]["message"]


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"target_epsilon": 0.001}, "target_epsilon", "epsilon"),
        ({"batch_size": 20_000}, "batch_size", "larger than the dataset"),
        ({"target_delta": 0.01}, "target_delta", "1/N"),
    ],
)
def test_plan_refusals_name_the_field_and_the_fix(api, tenant_key: str, change, param, words) -> None:  # type: ignore[no-untyped-def]
    body = {"num_records": 10_000, "batch_size": 100, "epochs": 3, "target_epsilon": 3.0, **change}
    response = api.post("/v1/privacy/plan", headers=auth(tenant_key), json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "infeasible_privacy_spec" and error["param"] == param
    assert words in error["message"]


def test_ledger_patch_and_delete(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    ds = upload(api, tenant_key).json()
    job = api.post("/v1/jobs", headers=auth(tenant_key), json=job_body(ds["id"])).json()
    ledger = api.get(f"/v1/datasets/{ds['id']}/ledger", headers=auth(tenant_key)).json()["data"]
    assert [(e["job_id"], e["state"]) for e in ledger] == [(job["id"], "reserved")]
    assert ledger[0]["epsilon"] == pytest.approx(job["plan"]["epsilon"])
    too_low = api.patch(f"/v1/datasets/{ds['id']}", headers=auth(tenant_key), json={"epsilon_budget": 1})
    assert too_low.status_code == 409
    patched = api.patch(f"/v1/datasets/{ds['id']}", headers=auth(tenant_key), json={"epsilon_budget": 20})
    assert patched.json()["epsilon_budget"] == 20
    busy = api.delete(f"/v1/datasets/{ds['id']}", headers=auth(tenant_key))
    assert busy.status_code == 409 and job["id"] in busy.json()["error"]["message"]
    api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(tenant_key))
    assert api.delete(f"/v1/datasets/{ds['id']}", headers=auth(tenant_key)).status_code == 200
    assert api.get(f"/v1/datasets/{ds['id']}", headers=auth(tenant_key)).status_code == 404
    assert api.get(f"/v1/jobs/{job['id']}", headers=auth(tenant_key)).status_code == 200


def test_jobs_filter_on_metadata(api, tenant_key: str, dataset: dict) -> None:  # type: ignore[no-untyped-def]
    tagged = {**job_body(dataset["id"]), "metadata": {"team": "risk", "run": "7"}}
    job = api.post("/v1/jobs", headers=auth(tenant_key), json=tagged).json()
    assert job["metadata"] == {"team": "risk", "run": "7"}
    found = api.get("/v1/jobs", headers=auth(tenant_key), params={"metadata[team]": "risk", "metadata[run]": "7"})
    assert [j["id"] for j in found.json()["data"]] == [job["id"]]
    none = api.get("/v1/jobs", headers=auth(tenant_key), params={"metadata[team]": "other"})
    assert none.json()["data"] == []
    too_many = {**job_body(dataset["id"]), "metadata": {str(i): "x" for i in range(17)}}
    assert api.post("/v1/jobs", headers=auth(tenant_key), json=too_many).status_code == 422


def test_metrics_answer_304_when_nothing_is_new(api, tenant_key: str, dataset: dict) -> None:  # type: ignore[no-untyped-def]
    job = api.post("/v1/jobs", headers=auth(tenant_key), json=job_body(dataset["id"])).json()
    first = api.get(f"/v1/jobs/{job['id']}/metrics", headers=auth(tenant_key), params={"since_step": 0})
    assert first.status_code == 200 and first.json()["data"] == [] and first.json()["next_since_step"] == 0
    etag = first.headers["ETag"]
    again = api.get(
        f"/v1/jobs/{job['id']}/metrics",
        headers={**auth(tenant_key), "If-None-Match": etag},
        params={"since_step": 0},
    )
    assert again.status_code == 304 and again.content == b""
    assert "not covered" in first.json()["note"]


def test_metrics_pages_follow_the_steps_and_refuse_bad_keys(api, tenant_key: str, dataset: dict) -> None:  # type: ignore[no-untyped-def]
    from service.auth import create_api_key, revoke_api_key
    from service.db import session_scope
    from service.models import JobMetric, utcnow

    job = api.post("/v1/jobs", headers=auth(tenant_key), json=job_body(dataset["id"])).json()["id"]
    with session_scope() as session:
        session.add_all(
            JobMetric(job_id=job, step=step, epsilon=0.01 * step, loss=2.0, learning_rate=1e-3, timestamp=utcnow())
            for step in (3, 1, 2, 5, 4)
        )
        revoked = create_api_key(session, "metrics-revoked")
        session.flush()
        revoke_api_key(session, revoked)
    url = f"/v1/jobs/{job}/metrics"
    first = api.get(url, headers=auth(tenant_key), params={"since_step": 0, "limit": 2}).json()
    assert [p["step"] for p in first["data"]] == [1, 2] and first["has_more"] and first["next_since_step"] == 2
    rest = api.get(url, headers=auth(tenant_key), params={"since_step": 2}).json()
    assert [p["step"] for p in rest["data"]] == [3, 4, 5] and not rest["has_more"]
    assert [p["epsilon"] for p in rest["data"]] == [0.03, 0.04, 0.05]
    for headers in ({}, auth("dpft_not-a-key"), auth(revoked)):
        response = api.get(url, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "unauthorized"
    missing = api.get("/v1/jobs/job_nope/metrics", headers=auth(tenant_key))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_concurrent_job_creations_cannot_together_overspend_a_budget(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import ThreadPoolExecutor

    ds = upload(api, tenant_key, epsilon_budget=10).json()
    body = job_body(ds["id"], target_epsilon=4.0)
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda _: api.post("/v1/jobs", headers=auth(tenant_key), json=body), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [201, 201, 409, 409, 409, 409], [r.text for r in responses]
    spent = api.get(f"/v1/datasets/{ds['id']}", headers=auth(tenant_key)).json()["epsilon_spent"]
    assert spent <= 10


def test_a_webhook_needs_a_signing_secret_configured(api, tenant_key: str, dataset: dict) -> None:  # type: ignore[no-untyped-def]
    body = {**job_body(dataset["id"]), "webhook_url": "http://127.0.0.1:9/hook"}
    response = api.post("/v1/jobs", headers=auth(tenant_key), json=body)
    assert response.status_code == 422 and "DPFT_WEBHOOK_SECRET" in response.json()["error"]["message"]
    bad = api.post("/v1/jobs", headers=auth(tenant_key), json={**body, "webhook_url": "not a url"})
    assert bad.status_code == 422


def test_prometheus_metrics(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    api.get("/v1/models", headers=auth(tenant_key))
    text = api.get("/metrics").text
    assert 'dpft_http_requests_total{method="GET",route="/v1/models",status="200"}' in text
    assert 'dpft_jobs{status="queued"}' in text


def test_prometheus_metrics_need_the_operator_token_when_one_is_set(api, tenant_key: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from service.settings import get_settings

    monkeypatch.setattr(get_settings(), "metrics_token", "operator-secret")
    for headers in ({}, auth(tenant_key), auth("operator-secre")):
        response = api.get("/metrics", headers=headers)
        assert response.status_code == 401 and "DPFT_METRICS_TOKEN" in response.json()["error"]["message"]
    assert "dpft_http_requests_total" in api.get("/metrics", headers=auth("operator-secret")).text


def test_concurrent_requests_with_one_idempotency_key_create_one_job(api, tenant_key: str, dataset: dict) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import ThreadPoolExecutor

    headers = {**auth(tenant_key), "Idempotency-Key": "concurrent-key"}
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(
            pool.map(lambda _: api.post("/v1/jobs", headers=headers, json=job_body(dataset["id"])), range(4))
        )
    codes = [r.status_code for r in responses]
    assert codes.count(201) == 1 and set(codes) <= {200, 201, 409}, codes
    ids = {r.json()["id"] for r in responses if r.status_code < 300}
    assert len(ids) == 1
    for r in responses:
        if r.status_code == 409:
            assert "Idempotency-Key" in r.json()["error"]["message"]


def test_a_request_while_the_first_with_its_idempotency_key_is_in_flight_is_409(
    api, tenant_key: str, dataset: dict, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from service import jobs

    solving, release = threading.Event(), threading.Event()
    real_solve = jobs.solve_plan

    def first_solve_waits(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not solving.is_set():
            solving.set()
            release.wait(30)
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(jobs, "solve_plan", first_solve_waits)
    headers = {**auth(tenant_key), "Idempotency-Key": "in-flight-key"}
    body = job_body(dataset["id"])
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(api.post, "/v1/jobs", headers=headers, json=body)
        assert solving.wait(30)
        second = api.post("/v1/jobs", headers=headers, json=body)
        release.set()
        first = first.result(timeout=60)
    assert second.status_code == 409, second.text
    assert second.json()["error"]["param"] == "Idempotency-Key"
    assert "already being processed" in second.json()["error"]["message"]
    assert first.status_code == 201
    third = api.post("/v1/jobs", headers=headers, json=body)
    assert third.status_code == 200 and third.json()["id"] == first.json()["id"]


def test_a_chunked_upload_over_the_limit_is_cut_off_while_it_streams_in(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    # No Content-Length: the body arrives in 64 KiB messages and must be refused at the limit
    # (256 KiB + 1 MiB multipart allowance here), not stored whole first. TestClient would send
    # the body as one message, so the app is driven over ASGI directly.
    import asyncio

    chunk, chunks = b"x" * 65536, 64  # 4 MiB in all
    part = b"--b\r\nContent-Disposition: form-data; name=file; filename=d.jsonl\r\n\r\n"
    consumed = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal consumed
        consumed += 1
        body = part + chunk[len(part) :] if consumed == 1 else chunk
        return {"type": "http.request", "body": body, "more_body": consumed < chunks}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/datasets", "raw_path": b"/v1/datasets", "query_string": b"", "root_path": "",
        "headers": [(b"authorization", f"Bearer {tenant_key}".encode()),
                    (b"content-type", b"multipart/form-data; boundary=b")],
        "client": ("127.0.0.1", 1), "server": ("testserver", 80),
    }  # fmt: skip
    stored_before = api.get("/v1/datasets", headers=auth(tenant_key)).json()["data"]
    asyncio.run(api.app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 413
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b"payload_too_large" in body and b"DPFT_MAX_UPLOAD_BYTES" in body
    assert consumed == (256 * 1024 + (1 << 20)) // len(chunk) + 1  # read up to the limit, no further
    assert api.get("/v1/datasets", headers=auth(tenant_key)).json()["data"] == stored_before


def test_a_body_declared_over_the_limit_is_refused_before_it_is_read(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    chunks = (b'{"text": "' + b"x" * 60_000 + b'"}\n' for _ in range(40))  # 2.4 MB, over limit + 1 MiB
    response = api.post(
        "/v1/datasets",
        headers={**auth(tenant_key), "Content-Type": "multipart/form-data; boundary=b"},
        content=b"--b\r\nContent-Disposition: form-data; name=file; filename=d.jsonl\r\n\r\n" + b"".join(chunks),
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("path", ["metrics?since_step=2147483648", "events?after=99999999999"])
def test_out_of_range_cursors_are_422(api, tenant_key: str, dataset: dict, path: str) -> None:  # type: ignore[no-untyped-def]
    job = api.post("/v1/jobs", headers=auth(tenant_key), json=job_body(dataset["id"])).json()
    response = api.get(f"/v1/jobs/{job['id']}/{path}", headers=auth(tenant_key))
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
