"""Workers that die, shut down or get the same job twice: the job still ends once, with one
metrics series (steps 1..N, each once) and the epsilon of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import time

import pytest
from celery import Celery

from service.queue import QUEUE, TRAIN_TASK

from .conftest import LEASE_S, FaultStack, assert_one_clean_series, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("stack_fixture", ["fault_stack", "embedded_fault_stack"])
def test_sigkilled_worker_job_resumes_on_a_new_worker(stack_fixture: str, request: pytest.FixtureRequest) -> None:
    stack: FaultStack = request.getfixturevalue(stack_fixture)  # PostgreSQL and Redis, or the embedded default
    stack.start_worker("a")
    job = stack.create_job(steps=60)
    plan = job["plan"]
    stack.wait_step(job["id"], 25)
    stack.kill_worker("a")
    killed_at = stack.job(job["id"]).step
    stack.start_worker("b")

    final = stack.wait_terminal(job["id"])
    assert final.status == "succeeded", (final.error, stack.logs())
    assert final.attempt == 2
    assert_one_clean_series(stack, job["id"], plan["steps"], plan["epsilon"])
    assert final.epsilon == pytest.approx(plan["epsilon"], rel=1e-9)
    assert stack.ledger(job["id"]).epsilon == pytest.approx(plan["epsilon"], rel=1e-9)

    events = stack.events(job["id"])
    types = [e["type"] for e in events]
    assert types == ["created", "queued", "started", "requeued", "started", "resumed", "succeeded"], types
    requeued = events[types.index("requeued")]
    assert "heartbeats" in requeued["message"] and requeued["data"]["reason"] == "heartbeat_lost"
    resumed = events[types.index("resumed")]["data"]
    # A complete checkpoint (every 10 steps; one being written at the kill is skipped) is only
    # taken once its steps' metrics are in the database: never past the last step it saw.
    assert resumed["from_step"] % 10 == 0 and killed_at - 20 <= resumed["from_step"] <= killed_at


def test_the_same_task_delivered_twice_at_once_trains_once(fault_stack: FaultStack) -> None:
    stack = fault_stack
    job = stack.create_job(steps=20)  # no worker yet: the API's message waits in the queue
    sender = Celery("dpft-test", broker=stack.env["DPFT_BROKER_URL"])
    sender.conf.broker_transport_options = {"global_keyprefix": stack.env["DPFT_BROKER_KEY_PREFIX"]}
    sender.send_task(TRAIN_TASK, args=[job["id"]], queue=QUEUE)  # a second delivery of the same job
    sender.close()
    stack.start_worker("a")
    stack.start_worker("b")

    final = stack.wait_terminal(job["id"])
    assert final.status == "succeeded", (final.error, stack.logs())
    assert final.attempt == 1
    assert_one_clean_series(stack, job["id"], job["plan"]["steps"], job["plan"]["epsilon"])
    types = [e["type"] for e in stack.events(job["id"])]
    assert types == ["created", "queued", "started", "succeeded"], types

    def both_deliveries_handled() -> bool:
        logs = stack.log("worker-a") + stack.log("worker-b")
        return logs.count("dpft.train_job[") >= 2 and "nothing to do" in logs

    wait_for(both_deliveries_handled, 60, "the second delivery to be received and skipped\n" + stack.logs())


def test_sigterm_checkpoints_and_hands_the_job_back(fault_stack: FaultStack) -> None:
    stack = fault_stack
    stack.start_worker("a")
    job = stack.create_job(steps=60)
    plan = job["plan"]
    stack.wait_step(job["id"], 13)  # between two interval checkpoints (every 10 steps)
    # What `docker stop` or Kubernetes does: SIGTERM to the worker's main process only.
    stack.signal_worker("a", signal.SIGTERM, group=False)
    stack.workers["a"].wait(timeout=60)

    def handed_back() -> dict | None:
        events = stack.events(job["id"])
        return next((e for e in events if e["type"] == "requeued"), None)

    requeued = wait_for(handed_back, 30, "the job to be handed back\n" + stack.logs())
    assert requeued["data"]["reason"] == "worker_shutdown"
    stopped_at = requeued["data"]["step"]
    assert stopped_at >= 13
    assert stack.job(job["id"]).status == "queued"
    stack.start_worker("b")

    final = stack.wait_terminal(job["id"])
    assert final.status == "succeeded", (final.error, stack.logs())
    assert_one_clean_series(stack, job["id"], plan["steps"], plan["epsilon"])
    events = stack.events(job["id"])
    resumed = next(e for e in events if e["type"] == "resumed")
    assert resumed["data"]["from_step"] == stopped_at, "resumed from the checkpoint taken at shutdown"
    assert "checkpoint" in requeued["message"]
    assert final.attempt == 1 and requeued["data"]["counted"] is False, "a shutdown is not a failed attempt"


def test_cancel_during_training_ends_within_a_few_steps_and_charges_the_ledger(fault_stack: FaultStack) -> None:
    stack = fault_stack
    stack.start_worker("a")
    job = stack.create_job(steps=200)
    stack.wait_step(job["id"], 5)
    with stack.client() as client:
        client.cancel_job(job["id"])
    asked_at = stack.job(job["id"]).step
    started = time.monotonic()
    final = stack.wait_terminal(job["id"], timeout=60)
    assert final.status == "cancelled" and final.stop_reason == "cancelled", (final.error, stack.logs())
    assert time.monotonic() - started < 30
    # The writer sees the request at its next flush (0.5 s), the trainer before its next step.
    assert final.step < job["plan"]["steps"]
    assert final.step >= asked_at
    rows = stack.metrics(job["id"])
    assert [r.step for r in rows] == list(range(1, final.step + 1))
    assert final.epsilon == pytest.approx(rows[-1].epsilon) and 0 < final.epsilon < job["plan"]["epsilon"]
    entry = stack.ledger(job["id"])
    assert entry.state == "spent" and entry.epsilon == pytest.approx(final.epsilon)
    assert LEASE_S > 0  # (the sweeper plays no part here)


def test_a_worker_configured_for_a_gpu_refuses_to_start_without_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    import torch

    from service import processes

    env = {name: "" for name in os.environ if name.startswith("DPFT_")}
    env.update({"DPFT_REQUIRE_GPU": "1", "DPFT_DATA_DIR": str(tmp_path)})
    log = tmp_path / "worker.log"
    worker = processes.start(processes.worker_command(), env=env, log_path=log)
    if torch.cuda.is_available():
        wait_for(lambda: "GPU check passed" in log.read_text(errors="replace"), 120, "the GPU check")
        processes.stop(worker)
        return
    try:
        code = worker.wait(timeout=120)
    except subprocess.TimeoutExpired:
        processes.stop(worker)
        raise AssertionError("the worker started on the CPU although DPFT_REQUIRE_GPU is set") from None
    assert code != 0
    assert "DPFT_REQUIRE_GPU is set but no usable GPU" in log.read_text(errors="replace")


def test_a_job_past_its_time_limit_fails_with_the_reason_and_is_charged(fault_stack: FaultStack) -> None:
    stack = fault_stack
    # A 40 s hard limit gives a 10 s soft limit (service.queue): the task ends the job itself.
    stack.start_worker("a", DPFT_TASK_TIME_LIMIT_S="40")
    job = stack.create_job(steps=5000)
    final = stack.wait_terminal(job["id"], timeout=120)
    assert (final.status, final.stop_reason) == ("failed", "time_limit"), (final.error, stack.logs())
    assert "time limit" in final.error and 0 < final.step < 5000
    rows = stack.metrics(job["id"])
    assert [r.step for r in rows] == list(range(1, final.step + 1))
    assert final.epsilon == pytest.approx(rows[-1].epsilon)
    entry = stack.ledger(job["id"])
    assert entry.state == "spent" and entry.epsilon == pytest.approx(final.epsilon)
