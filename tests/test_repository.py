"""The files a newcomer and an operator start from: the README's commands, CI, compose."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.unit


def readme_commands() -> list[str]:
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", quick_start, flags=re.S)]


def test_readme_quick_start_has_exactly_two_commands() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    assert commands[0].endswith("dpft demo")
    assert "torch==2.13.0" in commands[0] and "torch==2.13.0" in commands[1]


def test_ci_runs_the_readme_test_command_and_nothing_else() -> None:
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == readme_commands()[1]
    assert all(line.startswith(("set ", "cd ")) for line in ci[:-1])


def test_compose_file_is_valid() -> None:
    """Validated by docker-compose's own schema check (Debian's docker-compose; no engine needed)."""
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is needed to validate the compose file: apt-get install docker-compose"
    result = subprocess.run(
        [binary, "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    services = subprocess.run(
        [binary, "-f", str(ROOT / "docker-compose.yml"), "config", "--services"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.split()
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
