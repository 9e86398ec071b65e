"""Start the API and worker as child processes (used by `dpft up`, `dpft demo` and the tests).

The worker is started as `python -m celery -A worker.app`, never imported here: the service
package does not import the worker or torch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_command(extra: list[str] | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "worker",
        "--queues",
        "gpu",
        "--concurrency",
        "1",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        *(extra or []),
    ]


def api_command(host: str, port: int, workers: int = 1) -> list[str]:
    """`dpft api` without the access log (it is what sets up metrics shared between processes)."""
    command = [sys.executable, "-m", "service.cli", "api", "--host", host, "--port", str(port)]
    return [*command, "--workers", str(workers), "--log-level", "warning"]


def start(command: list[str], env: Mapping[str, str] | None = None, log_path: Path | None = None) -> subprocess.Popen:
    output = log_path.open("ab") if log_path else None
    return subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=output or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if output else subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after `timeout`."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")
