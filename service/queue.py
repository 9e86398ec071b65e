"""The Celery app, shared by the API (which sends tasks by name) and the worker (which runs them).

The database is the source of truth for jobs; Celery only delivers. Settings follow from long GPU
jobs: one message at a time per worker process, a fresh child process per task (CUDA is
initialised only there), a hard time limit, and no result backend.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery

from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)

TRAIN_TASK = "dpft.train_job"
QUEUE = "gpu"


def make_celery(settings: Settings) -> Celery:
    app = Celery("dpft", broker=settings.resolved_broker_url)
    # (kombu's SQLAlchemy transport hands its options to create_engine, so it gets none.)
    transport_options: dict[str, object] = {}
    if settings.resolved_broker_url.startswith("redis"):
        # Recovery is the heartbeat sweeper's job, not Redis re-delivering a long task while it runs.
        transport_options["visibility_timeout"] = max(settings.task_time_limit_s * 2, 7 * 24 * 3600)
        if settings.broker_key_prefix:
            transport_options["global_keyprefix"] = settings.broker_key_prefix
    app.conf.update(
        task_default_queue=QUEUE,
        task_routes={TRAIN_TASK: {"queue": QUEUE}},
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        task_time_limit=settings.task_time_limit_s,
        # The soft limit ends the job in a recorded terminal state (reason time_limit, epsilon spent
        # charged) before the hard limit kills the child.
        task_soft_time_limit=max(1, settings.task_time_limit_s - max(30, settings.task_time_limit_s // 20)),
        # A broker connection lost (Redis restart) must not stop a job that is training.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue_training(job_id: str) -> None:
    """Send the training task by name (the API never imports the worker)."""
    get_celery().send_task(TRAIN_TASK, args=[job_id], queue=QUEUE)
