"""Celery entry point for `dpft worker` (`celery -A worker.app worker -Q gpu`)."""

from worker.tasks import app

__all__ = ["app"]
