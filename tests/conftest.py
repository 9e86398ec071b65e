"""Shared fixtures: the real PostgreSQL and Redis of this machine, and running dpft stacks.

The suite never skips the real servers: when one is not running it is started with the
commands below, and when that fails the suite stops with a message saying what to run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy.orm import Session

from service import processes
from service.auth import create_api_key
from service.db import make_engine
from service.migrate import upgrade

PG_ADMIN_URL = os.environ.get("DPFT_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DPFT_TEST_REDIS", "redis://127.0.0.1:6379/0")
PG_START = ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "start"]
REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
]
WEBHOOK_SECRET = "whsec-test-secret"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _postgres_up() -> bool:
    try:
        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
        return True
    except psycopg.OperationalError:
        return False


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=3).ping())
    except redis.RedisError:
        return False


def _ensure(name: str, is_up, start_command: list[str]) -> None:  # type: ignore[no-untyped-def]
    if is_up():
        return
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(start_command, check=False, capture_output=True, timeout=60)
    for _ in range(50):
        if is_up():
            return
        time.sleep(0.2)
    pytest.exit(
        f"{name} is not reachable and could not be started; start it with: {' '.join(start_command)}",
        returncode=3,
    )


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    _ensure("PostgreSQL (127.0.0.1:5432)", _postgres_up, PG_START)
    return PG_ADMIN_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    _ensure("Redis (127.0.0.1:6379)", _redis_up, REDIS_START)
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh database for this test session, migrated to head, dropped afterwards."""
    name = f"dpft_test_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    upgrade(url)
    yield url
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_key(database_url: str, tenant: str) -> str:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            key = create_api_key(session, tenant)
            session.commit()
        return key
    finally:
        engine.dispose()


@dataclass
class Stack:
    """A running API and worker, and what a test needs to talk to them."""

    url: str
    database_url: str
    env: dict[str, str]
    root: Path
    processes: dict[str, object] = field(default_factory=dict)

    def key(self, tenant: str = "tests") -> str:
        return create_key(self.database_url, tenant)

    def artifact_path(self, key: str) -> Path:
        return Path(self.env.get("DPFT_ARTIFACT_DIR") or self.root / "artifacts") / key

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""


def _start_stack(env: dict[str, str], database_url: str, root: Path) -> Iterator[Stack]:
    # Settings this process holds for other fixtures must not leak into the stack's processes.
    env = {**{name: "" for name in os.environ if name.startswith("DPFT_")}, **env}
    port = processes.free_port()
    api = processes.start(processes.api_command("127.0.0.1", port), env=env, log_path=root / "api.log")
    worker = processes.start(processes.worker_command(), env=env, log_path=root / "worker.log")
    stack = Stack(
        url=f"http://127.0.0.1:{port}",
        database_url=database_url,
        env=env,
        root=root,
        processes={"api": api, "worker": worker},
    )
    try:
        processes.wait_for_http(f"{stack.url}/healthz", api)
        yield stack
    finally:
        processes.stop(api)
        processes.stop(worker)
        ARTIFACTS.mkdir(exist_ok=True)
        for name in ("api", "worker"):
            if (root / f"{name}.log").exists():
                shutil.copy(root / f"{name}.log", ARTIFACTS / f"{root.name}-{name}.log")


@pytest.fixture(scope="session")
def postgres_stack(postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API and worker on the real PostgreSQL and Redis (the production configuration)."""
    root = tmp_path_factory.mktemp("postgres-stack")
    env = {
        "DPFT_DATABASE_URL": postgres_url,
        "DPFT_BROKER_URL": redis_url,
        "DPFT_BROKER_KEY_PREFIX": f"dpft-test-{secrets.token_hex(4)}:",
        "DPFT_DATA_DIR": str(root),
        "DPFT_ARTIFACT_DIR": str(root / "artifacts"),
        "DPFT_METRICS_FLUSH_S": "0.5",
        "DPFT_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DPFT_WEBHOOK_BACKOFF_S": "0.3",
    }
    yield from _start_stack(env, postgres_url, root)


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API and worker on the embedded default: SQLite and the serverless (SQLite) broker."""
    root = tmp_path_factory.mktemp("embedded-stack")
    env = {"DPFT_DATA_DIR": str(root), "DPFT_METRICS_FLUSH_S": "0.5"}
    database_url = f"sqlite:///{root / 'dpft.db'}"
    upgrade(database_url)
    yield from _start_stack(env, database_url, root)


def reset_service_caches() -> None:
    """Settings, engine, broker and store are cached per process; drop them after env changes."""
    from service.artifacts import get_artifact_store
    from service.db import get_engine, get_sessionmaker
    from service.queue import get_celery
    from service.settings import get_settings

    if get_engine.cache_info().currsize:
        get_engine().dispose()
    for cached in (get_settings, get_engine, get_sessionmaker, get_celery, get_artifact_store):
        cached.cache_clear()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3-compatible server (moto's server mode) on 127.0.0.1, with test credentials."""
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    port = processes.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def api_env(
    postgres_url: str, redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """The in-process API configured on the real PostgreSQL and Redis (tasks go to a private prefix)."""
    root = tmp_path_factory.mktemp("api")
    (root / "shared-data").mkdir()
    env = {
        "DPFT_DATASET_FILE_ROOT": str(root / "shared-data"),
        "DPFT_S3_ENDPOINT_URL": s3_endpoint,
        "DPFT_DATABASE_URL": postgres_url,
        "DPFT_BROKER_URL": redis_url,
        "DPFT_BROKER_KEY_PREFIX": f"dpft-test-unconsumed-{secrets.token_hex(4)}:",
        "DPFT_DATA_DIR": str(root),
        "DPFT_ARTIFACT_DIR": str(root / "artifacts"),
        "DPFT_MAX_UPLOAD_BYTES": str(256 * 1024),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_service_caches()
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    reset_service_caches()


@pytest.fixture(scope="session")
def api(api_env: dict) -> Iterator[object]:
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app()) as client:
        yield client


@pytest.fixture(scope="session")
def tenant_key(postgres_url: str) -> str:
    return create_key(postgres_url, f"tenant-{secrets.token_hex(3)}")


@pytest.fixture(scope="session")
def other_tenant_key(postgres_url: str) -> str:
    return create_key(postgres_url, f"other-{secrets.token_hex(3)}")
