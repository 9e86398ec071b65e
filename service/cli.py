"""The `dpft` command: run the service's parts, the embedded demo, and manage API keys."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service import processes
from service.client import APIError, Client
from service.settings import get_settings

app = typer.Typer(help="dpft: differentially private fine-tuning as a service.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys (on the database, like migrate).", no_args_is_help=True)
datasets_app = typer.Typer(help="Datasets, over the API (DPFT_API_URL, DPFT_API_KEY).", no_args_is_help=True)
jobs_app = typer.Typer(help="Training jobs, over the API (DPFT_API_URL, DPFT_API_KEY).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
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
    workers: Annotated[int, typer.Option(help="API processes (each serves requests and drains webhooks).")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level; `info` logs every request.")] = "info",
) -> None:
    """Serve the HTTP API (uvicorn)."""
    import shutil

    import uvicorn

    from service.observability import MULTIPROCESS_DIR_VARIABLE, multiprocess_env

    shared_metrics = multiprocess_env(workers)
    os.environ.update(shared_metrics)
    try:
        uvicorn.run("service.app:app", host=host, port=port, log_level=log_level, workers=workers)
    finally:
        if shared_metrics:
            shutil.rmtree(shared_metrics[MULTIPROCESS_DIR_VARIABLE], ignore_errors=True)


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
            try:
                job = watch_job(client, job, timeout=DEMO_TIMEOUT_S)
            except TimeoutError:
                console.print(f"[red]The job did not finish in {DEMO_TIMEOUT_S:.0f} s[/red]; see {data_dir}/worker.log")
                raise typer.Exit(1) from None
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


def watch_job(client: Client, job: dict, *, timeout: float | None = None) -> dict:
    """Follow a job with a live progress bar (steps, epsilon of target, loss); returns it once it ended.

    Raises TimeoutError when it has not ended after `timeout` seconds."""
    target = job["target_epsilon"]
    columns = [
        TextColumn("[bold]{task.fields[status]:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TextColumn("epsilon {task.fields[epsilon]:.3f}" + (f" / {target:.3f}" if target else "")),
        TextColumn("loss {task.fields[loss]} (not DP)"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("train", total=job["total_steps"], status=job["status"], epsilon=0.0, loss="-")
        for current in client.follow(job["id"], interval=0.5, timeout=timeout):
            loss = "-"
            if current["step"]:
                latest = client.metrics(job["id"], since_step=current["step"] - 1, limit=1)["data"]
                if latest and latest[0]["loss"] is not None:
                    loss = f"{latest[0]['loss']:.3f}"
            progress.update(
                bar, completed=current["step"], status=current["status"], epsilon=current["epsilon"], loss=loss
            )
    return current


@contextmanager
def api_client() -> Iterator[Client]:
    """A client from DPFT_API_URL and DPFT_API_KEY; API errors end the command with their message."""
    settings = get_settings()
    if not settings.api_key:
        console.print("[red]Set DPFT_API_KEY to an API key (from `dpft keys create` or `dpft up`).[/red]")
        raise typer.Exit(2)
    try:
        with Client(settings.api_url, settings.api_key) as client:
            yield client
    except APIError as exc:
        where = f" ({exc.param})" if exc.param else ""
        console.print(f"[red]{exc.status_code} {exc.code}{where}:[/red] {exc.message}")
        raise typer.Exit(2) from None
    except httpx.ConnectError:
        console.print(f"[red]No dpft API at {settings.api_url}[/red]: start one (`dpft up`) or set DPFT_API_URL.")
        raise typer.Exit(2) from None


def print_json(data: object) -> None:
    console.print_json(json.dumps(data, default=str))


@datasets_app.command("upload")
def datasets_upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL or CSV file.")],
    name: Annotated[str | None, typer.Option(help="Display name (default: the file name).")] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the text.")] = "text",
    label_field: Annotated[str | None, typer.Option(help="Field holding the label.")] = None,
    entity_column: Annotated[str | None, typer.Option(help="Field naming each record's entity.")] = None,
    epsilon_budget: Annotated[float | None, typer.Option(help="Total epsilon all jobs may spend.")] = None,
) -> None:
    """Upload a dataset; prints it (with its id)."""
    with api_client() as client:
        print_json(
            client.upload_dataset(
                path,
                name=name,
                text_field=text_field,
                label_field=label_field,
                entity_column=entity_column,
                epsilon_budget=epsilon_budget,
            )
        )


@datasets_app.command("list")
def datasets_list() -> None:
    """List datasets with their privacy budget and what jobs spent of it."""
    with api_client() as client:
        table = Table("id", "name", "records", "entities", "epsilon spent", "budget")
        for d in client.list_datasets():
            budget = "" if d["epsilon_budget"] is None else f"{d['epsilon_budget']:.2f}"
            table.add_row(
                d["id"],
                d["name"],
                f"{d['num_records']:,}",
                str(d["num_entities"] or ""),
                f"{d['epsilon_spent']:.2f}",
                budget,
            )
        console.print(table)


@app.command()
def plan(
    batch_size: Annotated[int, typer.Option(help="Expected logical batch (privacy units per step).")],
    num_records: Annotated[int | None, typer.Option(help="Number of privacy units.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Or count a dataset's units.")] = None,
    entity_column: Annotated[str | None, typer.Option(help="With --dataset: count its entities.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Or the number of noisy steps.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Target epsilon (solve the noise).")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(help="Or a noise multiplier (report epsilon).")] = None,
    delta: Annotated[float | None, typer.Option(help="Target delta (default from the unit count).")] = None,
    accountant: Annotated[str, typer.Option(help="prv or rdp.")] = "prv",
) -> None:
    """Run the noise solver: the noise multiplier, steps and epsilon of a planned job."""
    with api_client() as client:
        result = client.plan(
            num_records=num_records,
            dataset_id=dataset,
            entity_column=entity_column,
            batch_size=batch_size,
            epochs=epochs,
            max_steps=max_steps,
            target_epsilon=epsilon,
            noise_multiplier=noise_multiplier,
            target_delta=delta,
            accountant=accountant,
        )
    result.pop("curve", None)
    print_json(result)


@jobs_app.command("create")
def jobs_create(
    dataset: Annotated[str, typer.Option(help="Dataset id (ds_...).")],
    epsilon: Annotated[float | None, typer.Option(help="Target epsilon for the whole job.")] = None,
    model: Annotated[str, typer.Option(help="Base model (see GET /v1/models).")] = "dpft/tiny-gpt2",
    task: Annotated[
        str, typer.Option(help="causal_lm, sequence_classification or token_classification.")
    ] = "causal_lm",
    epochs: Annotated[float | None, typer.Option(help="Passes over the data.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Or the number of noisy steps.")] = None,
    batch_size: Annotated[int, typer.Option(help="Expected logical batch.")] = 16,
    learning_rate: Annotated[float, typer.Option(help="Learning rate.")] = 5e-4,
    max_grad_norm: Annotated[float, typer.Option(help="Per-unit clipping norm.")] = 1.0,
    delta: Annotated[float | None, typer.Option(help="Target delta.")] = None,
    unit: Annotated[str, typer.Option(help="record or entity.")] = "record",
    entity_column: Annotated[str | None, typer.Option(help="Entity column, for --unit entity.")] = None,
    full: Annotated[bool, typer.Option(help="Full fine-tuning instead of LoRA.")] = False,
    spec: Annotated[Path | None, typer.Option(help="A JSON job request; the options above override it.")] = None,
    metadata: Annotated[list[str] | None, typer.Option(help="key=value, repeatable.")] = None,
    watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = False,
) -> None:
    """Create a DP fine-tuning job (the spec is solved first: an infeasible one is refused)."""
    request: dict = json.loads(spec.read_text()) if spec else {}
    request.update(dataset_id=dataset, base_model=model, task=task)
    hyper = request.setdefault("hyperparameters", {})
    hyper.update(batch_size=batch_size, learning_rate=learning_rate)
    if epochs is not None or max_steps is not None:
        hyper.update(epochs=epochs, max_steps=max_steps)
    privacy = request.setdefault("privacy", {})
    privacy.update(max_grad_norm=max_grad_norm, unit=unit, entity_column=entity_column, target_delta=delta)
    if epsilon is not None:
        privacy["target_epsilon"] = epsilon
    if full:
        request["lora"] = None
    for pair in metadata or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--metadata takes key=value, got {pair!r}")
        request.setdefault("metadata", {})[key] = value
    with api_client() as client:
        job = client.create_job(request)
        if not watch:
            print_json(job)
            return
        console.print(f"Created {job['id']}.")
        final = watch_job(client, job)
    raise typer.Exit(0 if final["status"] == "succeeded" else 1)


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
) -> None:
    """List jobs, newest first."""
    with api_client() as client:
        table = Table("id", "status", "model", "step", "epsilon", "target", "created")
        for j in client.list_jobs(status=status, limit=limit)["data"]:
            target = "" if j["target_epsilon"] is None else f"{j['target_epsilon']:.2f}"
            table.add_row(
                j["id"],
                j["status"],
                j["base_model"],
                f"{j['step']:,}/{j['total_steps']:,}",
                f"{j['epsilon']:.2f}",
                target,
                j["created_at"][:19],
            )
        console.print(table)


@jobs_app.command("watch")
def jobs_watch(job_id: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Follow a job with a progress bar (step, epsilon of target, loss); exits 0 if it succeeds."""
    with api_client() as client:
        final = watch_job(client, client.get_job(job_id))
    raise typer.Exit(0 if final["status"] == "succeeded" else 1)


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Cancel a job: a queued one at once, a running one within a few steps."""
    with api_client() as client:
        job = client.cancel_job(job_id)
    console.print(f"Job {job['id']} is {job['status']}.")


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None) -> None:
    """List API keys by prefix (the keys themselves are not stored)."""
    from sqlalchemy import select

    from service.db import session_scope
    from service.models import ApiKey, Tenant

    table = Table("tenant", "prefix", "created", "revoked")
    with session_scope() as session:
        query = select(Tenant.name, ApiKey).join(ApiKey, ApiKey.tenant_id == Tenant.id).order_by(ApiKey.created_at)
        if tenant:
            query = query.where(Tenant.name == tenant)
        for name, key in session.execute(query):
            table.add_row(
                name,
                key.prefix,
                f"{key.created_at:%Y-%m-%d %H:%M}",
                f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "",
            )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="The key, or its prefix from `dpft keys list`.")]) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    from service.auth import revoke_api_key
    from service.db import session_scope

    try:
        with session_scope() as session:
            revoked = revoke_api_key(session, key)
            prefix = revoked.prefix
    except LookupError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    console.print(f"Revoked key {prefix}.")


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
