"""`dpft demo`, the newcomer's first command: embedded service, shipped sample, exit 0 on success."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_a_dp_job_end_to_end_and_exits_0(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPFT_")}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "demo", "--data-dir", str(tmp_path / "demo")],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Succeeded: 50 steps, final epsilon" in result.stdout
    assert "of target 8.000" in result.stdout
    assert (tmp_path / "demo" / "dpft.db").exists()
