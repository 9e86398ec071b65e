"""The DP-SGD training engine: ``train()`` for the worker, ``DPTrainer`` for notebooks.

Public interface::

    from worker.engine import TrainingConfig, StepReport, TrainingOutcome, train
    from worker.engine import DPTrainer, PrivacyArguments

See ``run.py`` (``train``), ``trainer.py`` (``DPTrainer``) and ``config.py`` (``from_job``).
"""

from .config import Hyperparameters, LoraSpec, PrivacyArguments, TrainingConfig
from .errors import EngineError, PrivacyViolationError
from .run import TrainingOutcome, train
from .trainer import DPTrainer, StepReport

__all__ = [
    "DPTrainer",
    "EngineError",
    "Hyperparameters",
    "LoraSpec",
    "PrivacyArguments",
    "PrivacyViolationError",
    "StepReport",
    "TrainingConfig",
    "TrainingOutcome",
    "train",
]
