"""The `dpft` command as a user runs it: a separate process configured by the environment."""

from __future__ import annotations

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
