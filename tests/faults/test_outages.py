"""PostgreSQL and Redis going away for a few seconds while jobs train or wait.

These stop the machine's shared servers: outages are kept to a few seconds and the server is
always started again (in a `finally`)."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
import redis

from tests.conftest import REDIS_START

from .conftest import FaultStack, assert_one_clean_series, restart_postgres_after, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def logged_step(stack: FaultStack, worker: str, job_id: str) -> int:
    steps = re.findall(rf"job={job_id} step=(\d+)/", stack.log(f"worker-{worker}"))
    return max((int(s) for s in steps), default=0)


def test_postgres_outage_during_training_loses_no_metrics_row(fault_stack: FaultStack) -> None:
    stack = fault_stack
    # A lease longer than the outage: this job must ride it out, not be taken from its worker.
    stack.start_worker("a", DPFT_HEARTBEAT_LEASE_S="60")
    job = stack.create_job(steps=500)
    plan = job["plan"]
    stack.wait_step(job["id"], 20)
    before = logged_step(stack, "a", job["id"])
    restart_postgres_after(5.0)
    during = logged_step(stack, "a", job["id"])
    assert during > before + 5, "training went on while the database was away"

    final = stack.wait_terminal(job["id"], timeout=240)
    assert final.status == "succeeded", (final.error, stack.logs())
    assert final.attempt == 1
    assert_one_clean_series(stack, job["id"], plan["steps"], plan["epsilon"])
    assert "metrics flush failed" in (stack.root / "worker-a.log").read_text(errors="replace")


def test_redis_restart_with_one_job_running_and_one_queued_both_finish(fault_stack: FaultStack) -> None:
    stack = fault_stack
    stack.start_worker("a")  # one worker, one job at a time: the second waits in Redis
    running = stack.create_job(steps=300)
    queued = stack.create_job(steps=20)
    stack.wait_step(running["id"], 10)
    assert stack.job(queued["id"]).status == "queued"
    client = redis.Redis.from_url(stack.env["DPFT_BROKER_URL"])
    try:
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # the server closes the connection as it goes
    finally:
        time.sleep(1.0)
        subprocess.run(REDIS_START, check=False, capture_output=True, timeout=30)
        wait_for(lambda: redis.Redis.from_url(stack.env["DPFT_BROKER_URL"]).ping(), 30, "Redis to come back")

    for job in (running, queued):
        final = stack.wait_terminal(job["id"], timeout=240)
        assert final.status == "succeeded", (job["id"], final.error, stack.logs())
        assert_one_clean_series(stack, job["id"], job["plan"]["steps"], job["plan"]["epsilon"])
    assert "resent" in [e["type"] for e in stack.events(queued["id"])], "the lost message was sent again"


def test_a_database_outage_past_the_limit_fails_the_job_cleanly(fault_stack: FaultStack) -> None:
    stack = fault_stack
    stack.start_worker("a", DPFT_HEARTBEAT_LEASE_S="60", DPFT_METRICS_MAX_OUTAGE_S="1.5")
    job = stack.create_job(steps=500)
    stack.wait_step(job["id"], 20)
    restart_postgres_after(5.0)

    final = stack.wait_terminal(job["id"], timeout=120)
    assert (final.status, final.stop_reason) == ("failed", "metrics_outage"), (final.error, stack.logs())
    assert final.step < job["plan"]["steps"], "training stopped instead of running with unrecorded epsilon"
    rows = stack.metrics(job["id"])
    assert [r.step for r in rows] == list(range(1, final.step + 1)), "every step it took is recorded"
    assert final.epsilon == pytest.approx(rows[-1].epsilon)
    entry = stack.ledger(job["id"])
    assert entry.state == "spent" and entry.epsilon == pytest.approx(final.epsilon)
