"""API load from dashboards polling metrics while a job trains, and what metric writes cost training.

    .venv/bin/python bench/api_load.py [--pollers 10,100,500] [--duration 20] [--reps 3]

Needs the machine's PostgreSQL (127.0.0.1:5432, user postgres) and Redis (127.0.0.1:6379); makes
a database of its own and drops it afterwards.

1. Metric writes: the engine's ``train()`` on the tiny GPT-2 preset (LoRA, batch 16, 32 tokens),
   in a fresh subprocess per run, once with ``on_step`` recording into the worker's
   ``MetricsWriter`` (a background thread writing to PostgreSQL every second, as in a job) and
   once with ``on_step`` doing nothing; runs alternate, ``--reps`` of each. Step time is the time
   between the 20th and the last step's report, divided by the steps between.
2. Pollers: one API process (``dpft api``; ``--api-workers`` for more) and one worker training a long job;
   N simulated dashboards (asyncio, one ``httpx.AsyncClient`` connection pool of N) each poll
   ``GET /v1/jobs/{id}/metrics?since_step=<next_since_step>`` once a second with the previous
   ETag (as the dashboard does), for ``--duration`` seconds per N after a 3 s ramp-up. Dashboards
   start at the job's current step (steady state: each poll returns about one second of new
   points); ``--from-start`` makes each first fetch the whole curve so far (up to 1,000 points a
   page), all at once. Latency is
   measured on the client, so with 500 pollers it includes the client's own queueing on this
   machine's 2 cores, which it shares with the API, the worker and PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS = "redis://127.0.0.1:6379/0"


def job_body(dataset_id: str, steps: int) -> dict:
    return {
        "dataset_id": dataset_id,
        "base_model": "dpft/tiny-gpt2",
        "task": "causal_lm",
        "hyperparameters": {"max_steps": steps, "batch_size": 16, "learning_rate": 1e-2, "max_seq_length": 32},
        "lora": {"r": 4, "alpha": 8},
        "privacy": {"target_epsilon": 8.0, "max_grad_norm": 1.0},
    }


# ---- 1. the cost of metric writes to training ------------------------------------------------


def train_once(job_id: str, with_writer: bool, steps: int) -> dict:
    """In a fresh process: train the job's config for `steps` steps; return the step time."""
    from sqlalchemy import select

    from service.artifacts import get_artifact_store
    from service.datasets import load_records
    from service.db import session_scope
    from service.models import Dataset, Job
    from worker.engine import TrainingConfig, train
    from worker.metrics import MetricRow, MetricsWriter
    from worker.tasks import engine_spec

    with session_scope() as session:
        job = session.get(Job, job_id)
        dataset = session.scalar(select(Dataset).where(Dataset.id == job.dataset_id))
        session.expunge_all()
    records = load_records(get_artifact_store().path(dataset.storage_key), dataset.format)
    config = TrainingConfig.from_job(engine_spec(job, dataset), job.plan)
    times: list[float] = []
    writer = MetricsWriter(job_id, 1.0)
    flush_times: list[float] = []
    original_flush = writer.flush

    def timed_flush() -> None:
        start = time.perf_counter()
        original_flush()
        flush_times.append(time.perf_counter() - start)

    writer.flush = timed_flush  # type: ignore[method-assign]

    def on_step(report) -> None:  # type: ignore[no-untyped-def]
        times.append(time.perf_counter())
        if with_writer:
            from datetime import UTC, datetime

            writer.record(
                MetricRow(
                    step=report.step,
                    epsilon=report.epsilon,
                    loss=report.loss,
                    learning_rate=report.learning_rate,
                    timestamp=datetime.fromtimestamp(report.timestamp, UTC),
                )
            )

    with tempfile.TemporaryDirectory() as out:
        if with_writer:
            with writer:
                train(config, records, Path(out), on_step=on_step, checkpoint_every=None)
        else:
            train(config, records, Path(out), on_step=on_step, checkpoint_every=None)
    first = 20
    step_s = (times[-1] - times[first - 1]) / (len(times) - first)
    return {
        "with_writer": with_writer,
        "steps": len(times),
        "step_ms": step_s * 1000,
        "flushes": len(flush_times),
        "flush_ms_median": statistics.median(flush_times) * 1000 if flush_times else None,
    }


def measure_writes(env: dict, job_id: str, steps: int, reps: int) -> dict:
    results: dict[bool, list[float]] = {True: [], False: []}
    flush_ms: list[float] = []
    for rep in range(reps):
        for with_writer in (True, False) if rep % 2 == 0 else (False, True):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--_train",
                    job_id,
                    "--_with",
                    str(int(with_writer)),
                    "--_steps",
                    str(steps),
                ],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[with_writer].append(result["step_ms"])
            if result["flush_ms_median"] is not None:
                flush_ms.append(result["flush_ms_median"])
            print(f"  train run: writer={with_writer} step {result['step_ms']:.2f} ms", flush=True)
    with_ms, without_ms = statistics.median(results[True]), statistics.median(results[False])
    return {
        "step_ms_with_writes": with_ms,
        "step_ms_without": without_ms,
        "slowdown_pct": (with_ms / without_ms - 1) * 100,
        "runs_with": results[True],
        "runs_without": results[False],
        "flush_ms_median": statistics.median(flush_ms) if flush_ms else None,
    }


# ---- 2. pollers ----------------------------------------------------------------------------------


METRICS_ROUTE = 'route="/v1/jobs/{job_id}/metrics"'


def server_buckets(prometheus_text: str) -> dict[float, float]:
    """Cumulative counts per upper bound of the API's own latency histogram for metrics polls."""
    counts: dict[float, float] = {}
    for line in prometheus_text.splitlines():
        if line.startswith("dpft_http_request_duration_seconds_bucket{") and METRICS_ROUTE in line:
            bound = float(line.split('le="')[1].split('"')[0])
            counts[bound] = counts.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


async def poll(n: int, url: str, key: str, job_id: str, duration: float, since_step: int, server_side: bool) -> dict:
    """``server_side``: also read the API's own histogram (``/metrics``) before and after the measured
    window, to tell time spent in the API from queueing in this client process (summed over the
    API's processes when there are several)."""
    import httpx

    latencies: list[float] = []
    codes: dict[int, int] = {}
    errors: dict[str, int] = {}
    ramp = 3.0
    start = time.monotonic()
    measure_from, stop_at = start + ramp, start + ramp + duration
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=30
    ) as client:

        async def dashboard() -> None:
            since, etag = since_step, None
            await asyncio.sleep(random.random())
            while (now := time.monotonic()) < stop_at:
                headers = {"If-None-Match": etag} if etag else {}
                t0 = time.perf_counter()
                try:
                    r = await client.get(f"/v1/jobs/{job_id}/metrics", params={"since_step": since}, headers=headers)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    r = None
                took = time.perf_counter() - t0
                if now >= measure_from and r is not None:
                    latencies.append(took)
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if r is not None and r.status_code == 200:
                    body = r.json()
                    etag = r.headers.get("ETag")
                    since = body["next_since_step"]
                await asyncio.sleep(max(0.0, 1.0 - took))

        async def scrape_at(when: float) -> dict[float, float]:
            await asyncio.sleep(max(0.0, when - time.monotonic()))
            return server_buckets((await client.get("/metrics")).text) if server_side else {}

        before, *_ = await asyncio.gather(scrape_at(measure_from), *(dashboard() for _ in range(n)))
        after = await scrape_at(0)
    server = {}
    if after:
        answered = after[float("inf")] - before.get(float("inf"), 0.0)
        within = {bound: (after[bound] - before.get(bound, 0.0)) / answered for bound in sorted(after)}
        server = {
            "server_requests": answered,
            "server_within_25ms": within[0.025],
            "server_within_50ms": within[0.05],
            "server_p99_at_most_ms": 1000 * min(bound for bound, share in within.items() if share >= 0.99),
        }
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "pollers": n,
        "requests": len(latencies),
        "rps": len(latencies) / duration,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1] * 1000 if latencies else float("nan"),
        "codes": codes,
        "errors": errors,
        **server,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pollers", default="10,100,500")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument(
        "--from-start",
        action="store_true",
        help="every dashboard first fetches the whole curve so far (cold start) instead of polling from the current step",
    )
    parser.add_argument("--api-workers", type=int, default=1, help="API processes (dpft api --workers)")
    parser.add_argument("--_train")
    parser.add_argument("--_with", type=int, default=1)
    parser.add_argument("--_steps", type=int, default=200)
    args = parser.parse_args()
    if args._train:
        print(json.dumps(train_once(args._train, bool(args._with), args._steps)))
        return

    import httpx
    import psycopg

    from service import processes
    from service.client import Client
    from service.migrate import upgrade

    name = f"dpft_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    root = Path(tempfile.mkdtemp(prefix="dpft-bench-"))
    env = {k: "" for k in os.environ if k.startswith("DPFT_")}
    env.update(
        {
            "DPFT_DATABASE_URL": db_url,
            "DPFT_BROKER_URL": REDIS,
            "DPFT_BROKER_KEY_PREFIX": f"dpft-bench-{secrets.token_hex(4)}:",
            "DPFT_DATA_DIR": str(root),
            "DPFT_ARTIFACT_DIR": str(root / "artifacts"),
        }
    )
    started: list[subprocess.Popen] = []
    try:
        upgrade(db_url)
        from sqlalchemy.orm import Session

        from service.auth import create_api_key
        from service.db import make_engine

        engine = make_engine(db_url)
        with Session(engine) as session:
            key = create_api_key(session, "bench")
            session.commit()
        engine.dispose()
        port = processes.free_port()
        url = f"http://127.0.0.1:{port}"
        api = processes.start(
            processes.api_command("127.0.0.1", port, args.api_workers), env=env, log_path=root / "api.log"
        )
        started.append(api)
        processes.wait_for_http(f"{url}/healthz", api)
        sample = Path(str(resources.files("service.data") / "sample.jsonl"))
        with Client(url, api_key=key) as client:
            dataset = client.upload_dataset(sample, name="sample")["id"]
            write_job = client.create_job(job_body(dataset, args.train_steps))["id"]  # trained in-process below

        writes = None
        if args.reps:
            print(f"metric writes: {args.reps} runs each of {args.train_steps} steps", flush=True)
            writes = measure_writes(env, write_job, args.train_steps, args.reps)
            print(
                f"  step time: {writes['step_ms_with_writes']:.2f} ms with metric writes, "
                f"{writes['step_ms_without']:.2f} ms without (medians): {writes['slowdown_pct']:+.1f}%; "
                f"one flush (1 s of rows) takes {writes['flush_ms_median']:.1f} ms (median)",
                flush=True,
            )
        with Client(url, api_key=key) as client:
            client.cancel_job(write_job)  # queued: no worker has it

            worker = processes.start(processes.worker_command(), env=env, log_path=root / "worker.log")
            started.append(worker)
            job = client.create_job(job_body(dataset, 10_000))["id"]
            deadline = time.monotonic() + 180
            while client.get_job(job)["step"] < 20:
                if time.monotonic() > deadline:
                    raise SystemExit("the job did not start training: see " + str(root / "worker.log"))
                time.sleep(0.5)

        polls = []
        for n in [int(x) for x in args.pollers.split(",")]:
            with Client(url, api_key=key) as client:
                step0, t0 = client.get_job(job)["step"], time.monotonic()
            start_at = 0 if args.from_start else step0
            result = asyncio.run(poll(n, url, key, job, args.duration, start_at, server_side=True))
            try:
                with Client(url, api_key=key, timeout=120) as client:
                    result["train_steps_per_s"] = (client.get_job(job)["step"] - step0) / (time.monotonic() - t0)
            except httpx.HTTPError as exc:  # the API still working through the pollers' backlog
                result["train_steps_per_s"] = float("nan")
                result["after"] = f"GET /v1/jobs/{{id}} failed after the phase: {type(exc).__name__}"
            polls.append(result)
            print(
                f"  N={n}: {result['rps']:.0f} req/s, p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                f"max {result['max_ms']:.0f} ms, codes {result['codes']}, errors {result['errors']}, "
                f"training {result['train_steps_per_s']:.1f} steps/s {result.get('after', '')}"
                + (
                    f"; in the API: {result['server_within_50ms']:.1%} answered within 50 ms, "
                    f"{result['server_within_25ms']:.1%} within 25 ms, p99 at most {result['server_p99_at_most_ms']:g} ms"
                    if "server_requests" in result
                    else ""
                ),
                flush=True,
            )
        with contextlib.suppress(httpx.HTTPError), Client(url, api_key=key, timeout=120) as client:
            client.cancel_job(job)
        print(json.dumps({"metric_writes": writes, "pollers": polls}, indent=2))
    finally:
        for process in reversed(started):
            processes.stop(process)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
