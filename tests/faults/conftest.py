"""A stack for fault tests: the real API, PostgreSQL and Redis, and worker processes a test can
kill and start again. Each test gets its own broker key prefix and artifact directory; workers it
started are stopped, and jobs it left unfinished are closed, when it ends.

Short lease and sweep intervals make recovery fast: a job whose worker died is put back after
`LEASE_S` seconds.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service import processes
from service.client import Client
from service.db import make_engine
from service.migrate import upgrade
from service.models import Job, JobMetric, JobStatus, PrivacyLedgerEntry
from tests.conftest import PG_START, create_key

LEASE_S = 6.0
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SAMPLE = Path(str(resources.files("service.data") / "sample.jsonl"))
PG_STOP = ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "stop", "-m", "fast"]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # a server being restarted answers with errors for a while
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_error})")


@dataclass
class FaultStack:
    url: str
    database_url: str
    env: dict[str, str]
    root: Path
    api: subprocess.Popen
    key: str
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    dataset_id: str | None = None

    # ---- processes -------------------------------------------------------------------
    def start_worker(self, name: str, **env: str) -> subprocess.Popen:
        worker = processes.start(
            processes.worker_command(["--hostname", f"{name}@%h"]),
            env={**self.env, **env},
            log_path=self.root / f"worker-{name}.log",
        )
        self.workers[name] = worker
        return worker

    def signal_worker(self, name: str, sig: signal.Signals, *, group: bool = True) -> None:
        worker = self.workers[name]
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(worker.pid, sig)
            else:
                os.kill(worker.pid, sig)

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker and its pool child (a lost node: nothing runs on the way out)."""
        self.signal_worker(name, signal.SIGKILL)
        self.workers[name].wait(timeout=30)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.log('worker-' + name)}" for name in self.workers)

    # ---- API and database ----------------------------------------------------------------
    def client(self) -> Client:
        return Client(self.url, api_key=self.key, timeout=30)

    def dataset(self) -> str:
        if self.dataset_id is None:
            with self.client() as client:
                self.dataset_id = client.upload_dataset(SAMPLE, name="sample")["id"]
        return self.dataset_id

    def create_job(self, steps: int = 60, **privacy: Any) -> dict:
        body = {
            "dataset_id": self.dataset(),
            "base_model": "dpft/tiny-gpt2",
            "task": "causal_lm",
            "hyperparameters": {"max_steps": steps, "batch_size": 16, "learning_rate": 1e-2, "max_seq_length": 32},
            "lora": {"r": 4, "alpha": 8},
            "privacy": {"target_epsilon": 4.0, "max_grad_norm": 1.0, **privacy},
        }
        with self.client() as client:
            return client.create_job(body)

    def db(self) -> Session:
        return Session(self._engine)

    def job(self, job_id: str) -> Job:
        with self.db() as session:
            job = session.get(Job, job_id)
            session.expunge_all()
            return job

    def metrics(self, job_id: str) -> list[JobMetric]:
        with self.db() as session:
            rows = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.step)).all()
            session.expunge_all()
            return list(rows)

    def ledger(self, job_id: str) -> PrivacyLedgerEntry:
        with self.db() as session:
            entry = session.scalar(select(PrivacyLedgerEntry).where(PrivacyLedgerEntry.job_id == job_id))
            session.expunge_all()
            return entry

    def events(self, job_id: str) -> list[dict]:
        with self.client() as client:
            return client.events(job_id)

    def wait_step(self, job_id: str, step: int, timeout: float = 120) -> Job:
        def reached() -> Job | None:
            job = self.job(job_id)
            assert not JobStatus(job.status).is_terminal, f"job ended early: {job.status} {job.error}\n{self.logs()}"
            return job if job.step >= step else None

        return wait_for(reached, timeout, f"job {job_id} to reach step {step}\n{self.logs()}")

    def wait_terminal(self, job_id: str, timeout: float = 180) -> Job:
        return wait_for(
            lambda: (job := self.job(job_id)) and JobStatus(job.status).is_terminal and job,
            timeout,
            f"job {job_id} to end\n{self.logs()}",
            interval=0.5,
        )

    _engine: Any = None


def _fault_stack(database_url: str, broker_env: dict[str, str], tmp_path: Path) -> Iterator[FaultStack]:
    env = {name: "" for name in os.environ if name.startswith("DPFT_")}
    env.update(
        {
            **broker_env,
            "DPFT_DATA_DIR": str(tmp_path),
            "DPFT_ARTIFACT_DIR": str(tmp_path / "artifacts"),
            "DPFT_METRICS_FLUSH_S": "0.5",
            "DPFT_HEARTBEAT_LEASE_S": str(LEASE_S),
            "DPFT_SWEEP_INTERVAL_S": "1",
            "DPFT_RESEND_AFTER_S": "3",
            "DPFT_CHECKPOINT_EVERY": "10",
            "DPFT_MAX_ATTEMPTS": "3",
        }
    )
    port = processes.free_port()
    api = processes.start(processes.api_command("127.0.0.1", port), env=env, log_path=tmp_path / "api.log")
    stack = FaultStack(
        url=f"http://127.0.0.1:{port}",
        database_url=database_url,
        env=env,
        root=tmp_path,
        api=api,
        key=create_key(database_url, f"faults-{secrets.token_hex(3)}"),
    )
    stack._engine = make_engine(database_url)
    try:
        processes.wait_for_http(f"{stack.url}/healthz", api)
        yield stack
    finally:
        for worker in stack.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(timeout=30)
        processes.stop(api)
        # Close what this test left open, so no later sweeper resends it.
        with contextlib.suppress(Exception), stack.db() as session:
            session.execute(
                update(Job)
                .where(
                    Job.dataset_id == stack.dataset_id,
                    Job.status.in_([JobStatus.queued, JobStatus.running, JobStatus.cancelling]),
                )
                .values(status=JobStatus.failed, error="left unfinished by a fault test")
            )
            session.commit()
        stack._engine.dispose()
        ARTIFACTS.mkdir(exist_ok=True)
        for path in tmp_path.glob("*.log"):
            shutil.copy(path, ARTIFACTS / f"faults-{tmp_path.name}-{path.name}")


@pytest.fixture
def fault_stack(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[FaultStack]:
    """PostgreSQL and Redis, as in production."""
    broker = {
        "DPFT_DATABASE_URL": postgres_url,
        "DPFT_BROKER_URL": redis_url,
        "DPFT_BROKER_KEY_PREFIX": f"dpft-faults-{secrets.token_hex(4)}:",
    }
    yield from _fault_stack(postgres_url, broker, tmp_path)


@pytest.fixture
def embedded_fault_stack(tmp_path: Path) -> Iterator[FaultStack]:
    """The embedded default (SQLite, a broker in SQLite): nothing set but the data directory."""
    database_url = f"sqlite:///{tmp_path / 'dpft.db'}"
    upgrade(database_url)
    yield from _fault_stack(database_url, {}, tmp_path)


def assert_one_clean_series(stack: FaultStack, job_id: str, steps: int, plan_epsilon: float) -> list[JobMetric]:
    """Steps 1..N exactly once, epsilon strictly increasing, the last one the plan's epsilon."""
    rows = stack.metrics(job_id)
    assert [row.step for row in rows] == list(range(1, steps + 1)), "metrics are steps 1..N, each once"
    epsilons = [row.epsilon for row in rows]
    assert all(b > a for a, b in zip(epsilons, epsilons[1:], strict=False)), "epsilon strictly increasing"
    assert epsilons[-1] == pytest.approx(plan_epsilon, rel=1e-9), "same epsilon as an uninterrupted run"
    return rows


def restart_postgres_after(seconds: float) -> None:
    """Stop PostgreSQL, wait, start it again (always, even when interrupted)."""
    try:
        subprocess.run(PG_STOP, check=True, capture_output=True, timeout=60)
        time.sleep(seconds)
    finally:
        subprocess.run(PG_START, check=False, capture_output=True, timeout=60)
        wait_for(lambda: _pg_up(), 60, "PostgreSQL to come back")


def _pg_up() -> bool:
    import psycopg

    try:
        psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=2).close()
        return True
    except psycopg.OperationalError:
        return False


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
