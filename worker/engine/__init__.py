"""The DP-SGD training engine: ``train()`` for the worker, ``DPTrainer`` for notebooks.

Public interface::

    from worker.engine import TrainingConfig, StepReport, TrainingOutcome, train
    from worker.engine import DPTrainer, PrivacyArguments, privatize_trainer

See ``run.py`` (``train``), ``trainer.py`` (``DPTrainer``) and ``config.py`` (``from_job``).
"""

from .config import Hyperparameters, LoraSpec, PrivacyArguments, TrainingConfig
from .errors import EngineError, PrivacyViolationError
from .run import TrainingOutcome, train
from .trainer import DPTrainer, DPTrainerMixin, StepReport, privatize_trainer

__all__ = [
    "DPTrainer",
    "DPTrainerMixin",
    "EngineError",
    "Hyperparameters",
    "LoraSpec",
    "PrivacyArguments",
    "PrivacyViolationError",
    "StepReport",
    "TrainingConfig",
    "TrainingOutcome",
    "privatize_trainer",
    "train",
]
