"""The `dpft` command as a user runs it: a separate process configured by the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def dpft(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `dpft` with only the given DPFT_ settings (none inherited from this process)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DPFT_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_embedded_migrate_then_keys_create_prints_the_key_last(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {"DPFT_DATA_DIR": str(tmp_path)}
    migrated = dpft("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert (tmp_path / "dpft.db").exists()
    created = dpft("keys", "create", "--tenant", "acme", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("dpft_") and len(key) > 40
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("dpft.db*"))
    assert key.encode() not in stored, "only the hash of the key is stored"


def test_keys_create_against_postgres_authenticates(api, api_env: dict) -> None:  # type: ignore[no-untyped-def]
    created = dpft("keys", "create", "--tenant", "cli-tenant", env=api_env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert api.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_client_commands_run_a_job_against_the_real_stack(postgres_stack) -> None:  # type: ignore[no-untyped-def]
    from importlib import resources

    env = {"DPFT_API_URL": postgres_stack.url, "DPFT_API_KEY": postgres_stack.key("cli-user"), "COLUMNS": "200"}
    sample = str(resources.files("service.data") / "sample.jsonl")
    uploaded = dpft("datasets", "upload", sample, "--entity-column", "user_id", env=env)
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    dataset_id = json.loads(uploaded.stdout)["id"]

    planned = dpft("plan", "--dataset", dataset_id, "--batch-size", "16", "--max-steps", "8", "--epsilon", "3", env=env)
    assert planned.returncode == 0 and json.loads(planned.stdout)["steps"] == 8

    refused = dpft("plan", "--num-records", "100", "--batch-size", "16", "--epochs", "50", "--epsilon", "0.01", env=env)
    assert refused.returncode == 2 and "infeasible_privacy_spec" in refused.stdout

    created = dpft(
        "jobs",
        "create",
        "--dataset",
        dataset_id,
        "--epsilon",
        "3",
        "--max-steps",
        "8",
        "--metadata",
        "team=cli",
        "--watch",
        env=env,
    )
    assert created.returncode == 0, created.stdout + created.stderr + postgres_stack.log("worker")
    assert "succeeded" in created.stdout and "8/8" in created.stdout

    listed = dpft("jobs", "list", env=env)
    assert listed.returncode == 0 and "succeeded" in listed.stdout


def test_a_revoked_key_is_refused(api, api_env: dict, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    key = dpft("keys", "create", "--tenant", "to-revoke", env=api_env).stdout.strip().splitlines()[-1]
    assert api.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    revoked = dpft("keys", "revoke", key, env=api_env)
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    response = api.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]
    listed = dpft("keys", "list", "--tenant", "to-revoke", env=api_env)
    assert key[:12] in listed.stdout
