"""The `dpft` command: run the service's parts, the embedded demo, and manage API keys."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from service import processes
from service.settings import get_settings

app = typer.Typer(help="dpft: differentially private fine-tuning as a service.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console()

DEMO_TIMEOUT_S = 170.0


def _reset_settings() -> None:
    """Settings and engines are cached per process; drop them after the environment changed."""
    from service.artifacts import get_artifact_store
    from service.db import get_engine, get_sessionmaker
    from service.queue import get_celery

    for cached in (get_settings, get_engine, get_sessionmaker, get_celery, get_artifact_store):
        cached.cache_clear()


def _use_embedded(data_dir: Path) -> None:
    os.environ["DPFT_DATA_DIR"] = str(data_dir)
    for name in ("DPFT_DATABASE_URL", "DPFT_BROKER_URL", "DPFT_ARTIFACT_DIR"):
        os.environ.pop(name, None)
    _reset_settings()


def _create_key(tenant: str) -> str:
    from service.auth import create_api_key
    from service.db import session_scope

    with session_scope() as session:
        return create_api_key(session, tenant)


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema (Alembic)."""
    from service.migrate import upgrade

    upgrade()
    console.print(f"Database at {_safe_url()} is up to date.")


def _safe_url() -> str:
    from sqlalchemy.engine import make_url

    return make_url(get_settings().resolved_database_url).render_as_string(hide_password=True)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Serve the HTTP API (uvicorn)."""
    import uvicorn

    uvicorn.run("service.app:app", host=host, port=port, log_level="info")


@app.command()
def worker() -> None:
    """Run a training worker (Celery, queue `gpu`, one task per child process)."""
    command = processes.worker_command()
    os.execv(command[0], command)


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Run the whole service on this machine (migrate, API and a worker) until Ctrl-C."""
    from service.migrate import upgrade

    settings = get_settings()
    settings.ensure_dirs()
    upgrade()
    key = _create_key("default")
    log = settings.data_dir / "worker.log"
    worker_process = processes.start(processes.worker_command(), log_path=log)
    console.print(f"dpft is up at http://{host}:{port} (database {_safe_url()}); worker log: {log}")
    console.print(f"A development key for tenant 'default' (export DPFT_API_KEY={key}):")
    console.print(key, soft_wrap=True)
    try:
        import uvicorn

        uvicorn.run("service.app:app", host=host, port=port, log_level="warning")
    finally:
        processes.stop(worker_process)


@app.command()
def demo(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Where to keep the demo's database and artifacts (default: a new temp dir)."),
    ] = None,
    target_epsilon: Annotated[float, typer.Option(help="Epsilon the demo job may spend.")] = 8.0,
) -> None:
    """Run one DP fine-tuning job end to end on the embedded service and a shipped sample dataset."""
    from service.client import Client
    from service.migrate import upgrade

    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="dpft-demo-"))
    _use_embedded(data_dir)
    settings = get_settings()
    settings.ensure_dirs()
    console.print(f"Starting the embedded service in {data_dir} (SQLite, serverless broker) ...")
    upgrade()
    key = _create_key("demo")
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}"
    api_process = processes.start(processes.api_command("127.0.0.1", port), log_path=data_dir / "api.log")
    worker_process = processes.start(processes.worker_command(), log_path=data_dir / "worker.log")
    try:
        processes.wait_for_http(f"{url}/healthz", api_process)
        with Client(url, api_key=key) as client:
            sample = resources.files("service.data") / "sample.jsonl"
            with resources.as_file(sample) as sample_path:
                dataset = client.upload_dataset(sample_path, name="support-tickets-sample")
            console.print(f"Uploaded {dataset['num_records']} records as {dataset['id']}.")
            job = client.create_job(
                {
                    "dataset_id": dataset["id"],
                    "base_model": "dpft/tiny-gpt2",
                    "task": "causal_lm",
                    "hyperparameters": {
                        "epochs": 2,
                        "batch_size": 16,
                        "learning_rate": 2e-3,
                        "max_seq_length": 48,
                    },
                    "lora": {"r": 8, "alpha": 16},
                    "privacy": {"target_epsilon": target_epsilon, "max_grad_norm": 1.0},
                }
            )
            plan = job["plan"]
            console.print(
                f"Job {job['id']}: {plan['steps']} noisy steps, noise multiplier {plan['noise_multiplier']:.3f}, "
                f"sampling probability {plan['sampling_probability']:.3f}, delta {plan['delta']:.2e} "
                f"({plan['accountant']} accountant)."
            )
            job = _watch(client, job, timeout=DEMO_TIMEOUT_S, worker_log=data_dir / "worker.log")
    finally:
        processes.stop(api_process)
        processes.stop(worker_process)

    target = job["target_epsilon"]
    if job["status"] != "succeeded":
        console.print(
            f"[red]Job {job['status']}[/red]: {job.get('error') or job.get('stop_reason')}. "
            f"Worker log: {data_dir / 'worker.log'}"
        )
        raise typer.Exit(1)
    console.print(
        f"[green]Succeeded[/green]: {job['step']} steps, final epsilon {job['epsilon']:.3f} of target {target:.3f} "
        f"(delta {job['plan']['delta']:.2e}). Adapter and privacy report: {settings.resolved_artifact_dir}/jobs/{job['id']}"
    )


def _watch(client, job: dict, *, timeout: float, worker_log: Path) -> dict:  # type: ignore[no-untyped-def]
    """Follow a job with a progress bar of steps and epsilon; returns the job in its final state."""
    target = job["target_epsilon"]
    columns = [
        TextColumn("[bold]{task.fields[status]:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TextColumn("epsilon {task.fields[epsilon]:.3f}" + (f" / {target:.3f}" if target else "")),
        TimeElapsedColumn(),
    ]
    deadline = time.monotonic() + timeout
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("train", total=job["total_steps"], status=job["status"], epsilon=0.0)
        for current in client.follow(job["id"], interval=0.5):
            progress.update(bar, completed=current["step"], status=current["status"], epsilon=current["epsilon"])
            if time.monotonic() > deadline:
                console.print(
                    f"[red]The job did not finish within {timeout:.0f} s[/red]; worker log: {worker_log}"
                )
                raise typer.Exit(1)
    return current


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant that owns the key (created if new).")],
) -> None:
    """Create an API key; it is printed once, as the last line."""
    key = _create_key(tenant)
    console.print(f"Created a key for tenant {tenant!r}. Store it now: only its hash is kept.")
    sys.stdout.write(key + "\n")


if __name__ == "__main__":
    app()
