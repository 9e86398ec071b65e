"""Errors the engine raises for a job that cannot run as specified (the task reports them)."""

from __future__ import annotations


class EngineError(Exception):
    """A job spec, dataset or model that the engine cannot train as asked; the message says why."""


class PrivacyViolationError(EngineError):
    """Training was about to break a privacy invariant (PRIVACY.md) and was stopped instead."""
