"""``DPTrainer``: a ``transformers.Trainer`` that runs DP-SGD, one hook per reason.

How the Trainer's loop is made private (numbers refer to TRAINER-NOTES.md breakages and
PRIVACY.md invariants):

* ``get_train_dataloader``: one Poisson sample of units per logical step at the plan's ``q``
  (PRIVACY 1-3, 5); the Trainer's gradient accumulation is forced to 1 because a logical batch
  arrives whole and is split into physical micro-batches inside ``training_step`` (breakage 3:
  nothing rescales the loss across micro-batches).
* ``create_optimizer``: attaches Opacus' per-sample gradient hooks to the model *without*
  wrapping it (the Trainer keeps seeing the plain model: forward signature, label names and
  saving all work; breakages 1 and 7), then wraps the Trainer's optimizer in ``NoisyOptimizer``.
* ``training_step``: clears per-sample state (breakage 2), runs the micro-batches with a
  summed per-sample loss, clips and accumulates each micro-batch, leaves the noise and the step
  to the Trainer's ``optimizer.step()``. An empty batch takes a noise-only step (PRIVACY 3).
* The Trainer's own ``max_grad_norm`` is forced off (breakage 4) and its pre-noise ``grad_norm``
  is neither computed nor logged (breakage 6, PRIVACY 15).
* ``PrivacyCallback`` counts noisy steps from the optimizer itself (PRIVACY 4), asks the
  accountant for epsilon after each, and stops training before a step that would exceed the
  plan's steps or the target epsilon (PRIVACY 13).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping, DPPerLayerOptimizer
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments

from .config import PrivacyArguments
from .data import IGNORE_INDEX
from .errors import EngineError, PrivacyViolationError
from .randomness import RandomSource, make_random_source
from .sampling import PoissonBatchSampler

logger = logging.getLogger(__name__)

EpsilonFn = Callable[[int], float]

#: File in each checkpoint with the noisy-step count and the sampler's and noise's state.
DP_STATE_FILE = "dp_state.pt"


@dataclass(frozen=True)
class StepReport:
    """What is reported after each logical (noisy) step.

    ``epsilon`` is the accountant's upper bound after ``step`` noisy steps. ``loss`` is the mean
    per-example training loss of the step's Poisson batch: it is computed from private data
    outside DP-SGD and is NOT covered by the privacy guarantee (PRIVACY.md 15); show it as such.
    It is NaN for an empty batch. Neither the pre-noise gradient norm nor the batch size is
    reported: both would leak.
    """

    step: int
    epsilon: float
    loss: float
    learning_rate: float
    timestamp: float


class NoisySteps:
    """Mixin for Opacus' DP optimizers: noise from a ``RandomSource`` and a noisy-step counter.

    Clipping, accumulation and the division by the expected (public) batch size stay Opacus';
    only the noise source changes, so that production noise is cryptographically secure
    without torchcsprng (see ``randomness.py``). ``noisy_steps`` counts every call that added
    noise: it is what the accountant is asked about (PRIVACY.md 4).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, random: RandomSource, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)  # type: ignore[call-arg]
        self.random = random
        self.noisy_steps = 0
        self.last_learning_rate = float("nan")
        #: Data parallel: every process clips its own share; one process adds the noise, and the
        #: noisy sum is all-reduced, so each logical step carries exactly one noise draw.
        self.distributed = False
        self.adds_noise = True

    def add_noise(self) -> None:
        # For per-layer clipping ``max_grad_norm`` is the norm of the per-layer bounds: the
        # sensitivity of the summed gradient, as in Opacus.
        std = self.noise_multiplier * self.max_grad_norm  # type: ignore[attr-defined]
        params = self.params  # type: ignore[attr-defined]
        sizes = [p.summed_grad.numel() for p in params]
        flat = torch.cat([p.summed_grad.reshape(-1) for p in params])
        if std > 0 and self.adds_noise:
            # One draw for all parameters: the secure source pays per call, not per value.
            flat = flat + self.random.normal(flat.shape, std, flat.dtype, flat.device)
        if self.distributed:
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        for p, noisy in zip(params, flat.split(sizes), strict=True):
            p.grad = noisy.view_as(p).to(p.dtype)
        self.noisy_steps += 1
        self.last_learning_rate = float(self.param_groups[0]["lr"])  # type: ignore[attr-defined]


class NoisyOptimizer(NoisySteps, DPOptimizer):
    """Flat clipping of per-sample gradients (hooks mode)."""


class NoisyPerLayerOptimizer(NoisySteps, DPPerLayerOptimizer):
    """Per-layer clipping: each parameter tensor clipped to C / sqrt(K), total bound C."""


class NoisyGhostOptimizer(NoisySteps, DPOptimizerFastGradientClipping):
    """Ghost clipping: gradients arrive already clipped and summed in ``p.grad``."""


def per_example_loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of each example on its own, shape (batch,).

    Token tasks average over the example's own labelled tokens, so an example's gradient never
    depends on how many tokens other examples have (PRIVACY.md 8); padding and -100 labels
    contribute nothing (PRIVACY.md 7). An example with no labelled token has loss 0.
    """
    if task == "sequence_classification":
        return nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    if task == "causal_lm":
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    token_loss = nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    ).view(labels.shape)
    mask = labels.ne(IGNORE_INDEX)
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class PrivacyCallback(TrainerCallback):
    """Counts noisy steps, reports epsilon, and stops before the budget or the plan is exceeded."""

    def __init__(self, trainer: DPTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
        self.trainer._restore_dp_state(state.global_step)
        self.trainer._check_budget_for_next_step(control)
        return control

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            self.trainer.save_dp_state(checkpoint)
        return control

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
        trainer = self.trainer
        optimizer = trainer.dp_optimizer
        steps = optimizer.noisy_steps
        if steps != state.global_step:
            raise PrivacyViolationError(
                f"the Trainer took {state.global_step} steps but {steps} added noise: accounting would be wrong"
            )
        epsilon = trainer.epsilon_after(steps)
        report = StepReport(
            step=steps,
            epsilon=epsilon,
            loss=trainer.last_step_loss,
            learning_rate=optimizer.last_learning_rate,
            timestamp=time.time(),
        )
        trainer.step_reports.append(report)
        if trainer.on_step is not None and trainer.rank == 0:
            trainer.on_step(report)
        cancel = trainer.rank == 0 and trainer.should_stop is not None and trainer.should_stop()
        if trainer.world_size > 1:
            # Every process must stop at the same step, or the others wait forever.
            flag = torch.tensor([1 if cancel else 0], device=args.device)  # NCCL needs a GPU tensor
            torch.distributed.broadcast(flag, src=0)
            cancel = bool(flag.item())
        if cancel:
            trainer.stop_reason = "cancelled"
            control.should_training_stop = True
            if trainer.checkpoint_on_stop and args.save_strategy != "no":
                control.should_save = True
            return control
        trainer._check_budget_for_next_step(control)
        return control


class DPTrainerMixin:
    """DP-SGD for a ``transformers.Trainer`` class; see ``DPTrainer`` and ``privatize_trainer``.

    ``args.per_device_train_batch_size`` is the physical micro-batch (memory only); the logical
    batch is a Poisson sample with probability ``privacy_args.sampling_probability`` per unit.
    ``args.max_steps`` is set to ``privacy_args.steps`` (a different explicit value is refused).
    ``units`` lists each privacy unit's record indices in ``train_dataset`` (default: one unit
    per record). ``epsilon_fn(steps)`` is the accountant's epsilon after ``steps`` noisy steps
    (default: ``service.privacy.EpsilonTracker`` for the mechanism in ``privacy_args``).
    ``task`` picks the per-example loss (``causal_lm`` shifts labels by one).
    """

    def __init__(
        self,
        *args: Any,
        privacy_args: PrivacyArguments,
        units: Sequence[Sequence[int]] | None = None,
        task: str = "causal_lm",
        epsilon_fn: EpsilonFn | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        **kwargs: Any,
    ) -> None:
        self.privacy_args = privacy_args
        self.task = task
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if not isinstance(training_args, TrainingArguments):
            raise EngineError("a DP trainer needs explicit TrainingArguments (args=...)")
        _make_args_private(training_args, privacy_args)
        super().__init__(*args, **kwargs)
        _turn_off_activation_checkpointing(self.model)
        _refuse_unit_mixing_modules(self.model)
        if self.train_dataset is None:
            raise EngineError("a DP trainer needs train_dataset")
        if units is None:
            units = [[index] for index in range(len(self.train_dataset))]
        self.units = units
        self.rank, self.world_size = self.args.process_index, self.args.world_size
        seed = self.args.seed
        self.sampler_random = make_random_source(secure_mode=privacy_args.secure_mode, seed=seed + 1000 * self.rank)
        self.noise_random = make_random_source(secure_mode=privacy_args.secure_mode, seed=seed + 1)
        if not privacy_args.secure_mode:
            logger.warning("secure_mode is off: sampling and noise are seeded; this run is NOT private")
        self.expected_batch_size = privacy_args.expected_batch_size or privacy_args.sampling_probability * len(units)
        if epsilon_fn is None:
            from .accounting import epsilon_fn_for

            epsilon_fn = epsilon_fn_for(privacy_args)
        self._epsilon_fn = epsilon_fn
        self._epsilon_cache: dict[int, float] = {}
        self.on_step = on_step
        self.should_stop = should_stop
        self.step_reports: list[StepReport] = []
        self.stop_reason: str | None = None
        #: Save a checkpoint at the step where ``should_stop`` stopped training (needs saving on).
        self.checkpoint_on_stop = False
        self.last_step_loss = float("nan")
        self.grad_sample_module: GradSampleModule | None = None
        self.add_callback(PrivacyCallback(self))

    # ---- accounting -------------------------------------------------------------------
    def epsilon_after(self, steps: int) -> float:
        """The accountant's epsilon after ``steps`` noisy steps (0 before any)."""
        if steps <= 0:
            return 0.0
        if steps not in self._epsilon_cache:
            self._epsilon_cache[steps] = float(self._epsilon_fn(steps))
        return self._epsilon_cache[steps]

    @property
    def noisy_steps(self) -> int:
        """Noisy steps taken so far (restored from a checkpoint when resuming)."""
        if isinstance(self.optimizer_or_none, NoisySteps):
            return self.dp_optimizer.noisy_steps
        return getattr(self, "_steps_without_optimizer", 0)

    @property
    def optimizer_or_none(self) -> torch.optim.Optimizer | None:
        optimizer = self.optimizer
        return getattr(optimizer, "optimizer", optimizer)

    @property
    def dp_optimizer(self) -> Any:
        optimizer = self.optimizer_or_none
        if not isinstance(optimizer, NoisySteps):
            raise EngineError("the DP optimizer has not been created yet")
        return optimizer

    def _next_step_allowed(self) -> str | None:
        """None when one more noisy step is allowed, else the stop reason."""
        return self._stop_reason_after(self.noisy_steps)

    def _stop_reason_after(self, steps: int) -> str | None:
        """None when a step may follow ``steps`` noisy steps, else why not."""
        next_step = steps + 1
        if next_step > self.privacy_args.steps:
            return "completed"
        target = self.privacy_args.target_epsilon
        if target is not None and self.epsilon_after(next_step) > target:
            return "epsilon_budget"
        return None

    def _check_budget_for_next_step(self, control: Any) -> None:
        reason = self._next_step_allowed()
        if reason is not None:
            self.stop_reason = reason
            control.should_training_stop = True

    # ---- checkpoints (PRIVACY.md 14) -----------------------------------------------------
    def save_dp_state(self, checkpoint: Path) -> None:
        """Write what the accountant and the sampler need to continue into ``checkpoint``.

        Written last, after the Trainer's own files: a checkpoint without ``dp_state.pt`` is
        incomplete and never resumed from.
        """
        state = {
            "noisy_steps": self.noisy_steps,
            "privacy": asdict(self.privacy_args),
            "sampler_random": self.sampler_random.state_dict(),
            "noise_random": self.noise_random.state_dict(),
        }
        name = _dp_state_name(self.rank)
        temporary = checkpoint / (name + ".tmp")
        torch.save(state, temporary)
        os.replace(temporary, checkpoint / name)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``; resuming also restores the noisy-step count and the sampler state."""
        if isinstance(resume_from_checkpoint, bool):
            raise EngineError("pass the checkpoint directory to resume from (see latest_checkpoint)")
        done = 0
        if resume_from_checkpoint is not None:
            self._resume_state = _load_dp_state(Path(resume_from_checkpoint), self.privacy_args, self.rank)
            done = int(self._resume_state["noisy_steps"])
        reason = self._stop_reason_after(done)
        if reason is not None:
            # Not even one more step is allowed (a finished run resumed, or a target below the
            # first step's epsilon): the Trainer would take a step before any callback could stop
            # it, so do not start it. The weights are the checkpoint's.
            if resume_from_checkpoint is not None:
                self._load_from_checkpoint(str(resume_from_checkpoint))
            self._steps_without_optimizer = done
            self.stop_reason = reason
            return None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _restore_dp_state(self, global_step: int) -> None:
        state = getattr(self, "_resume_state", None)
        if state is None:
            return
        optimizer = self.dp_optimizer
        optimizer.noisy_steps = int(state["noisy_steps"])
        if optimizer.noisy_steps != global_step:
            raise PrivacyViolationError(
                f"checkpoint has {optimizer.noisy_steps} noisy steps but the Trainer resumes at step {global_step}"
            )
        self.sampler_random.load_state_dict(state["sampler_random"])
        self.noise_random.load_state_dict(state["noise_random"])
        self._resume_state = None

    # ---- Trainer hooks ----------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        # Data parallel: each process samples its own share of the units with the same q; the
        # union over processes is one Poisson sample of all units.
        units = self.units[self.rank :: self.world_size]
        sampler = PoissonBatchSampler(units, self.privacy_args.sampling_probability, self.sampler_random)
        self.poisson_sampler = sampler
        return DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=_empty_batches_allowed(self.data_collator, self.train_dataset[0]),
            num_workers=0,
            pin_memory=False,
        )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        super().create_optimizer(model)
        if isinstance(self.optimizer, NoisySteps):
            return self.optimizer
        target = self.model if model is None else model
        privacy = self.privacy_args
        ghost = privacy.grad_sample_mode == "ghost"
        if ghost:
            _refuse_tied_trainable_parameters(target)
        if self.grad_sample_module is None:
            # Hooks only: the Trainer keeps calling the plain model and the hooks still fire.
            try:
                if ghost:
                    self.grad_sample_module = GradSampleModuleFastGradientClipping(
                        target,
                        batch_first=True,
                        loss_reduction="sum",
                        strict=False,
                        max_grad_norm=privacy.max_grad_norm,
                        use_ghost_clipping=True,
                    )
                else:
                    self.grad_sample_module = GradSampleModule(
                        target, batch_first=True, loss_reduction="sum", strict=False
                    )
            except NotImplementedError as error:
                raise EngineError(f"grad_sample_mode={privacy.grad_sample_mode!r}: {error}") from error
        common = {
            "random": self.noise_random,
            "noise_multiplier": privacy.noise_multiplier,
            "expected_batch_size": self.expected_batch_size,
            "loss_reduction": "mean",
        }
        if ghost:
            self.optimizer = NoisyGhostOptimizer(self.optimizer, max_grad_norm=privacy.max_grad_norm, **common)
        elif privacy.clipping == "per_layer":
            count = len([p for group in self.optimizer.param_groups for p in group["params"]])
            bounds = [privacy.max_grad_norm / count**0.5] * count
            self.optimizer = NoisyPerLayerOptimizer(self.optimizer, max_grad_norm=bounds, **common)
        else:
            self.optimizer = NoisyOptimizer(self.optimizer, max_grad_norm=privacy.max_grad_norm, **common)
        self.optimizer.distributed = self.world_size > 1
        self.optimizer.adds_noise = self.rank == 0
        return self.optimizer

    def per_example_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each example's own loss, shape (batch,)."""
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**model_inputs)
        return per_example_loss(self.task, outputs.logits, inputs["labels"])

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The SUM over examples of each example's own loss (Opacus hooks with reduction 'sum')."""
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**model_inputs)
        loss = per_example_loss(self.task, outputs.logits, inputs["labels"]).sum()
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """One logical batch: micro-batches clipped and accumulated; noise comes at ``step()``."""
        reason = self._next_step_allowed()
        if reason is not None:
            raise PrivacyViolationError(f"a noisy step beyond the plan was attempted ({reason})")
        optimizer = self.dp_optimizer
        ghost = isinstance(optimizer, NoisyGhostOptimizer)
        # Breakage 2: the Trainer zeroes the model's gradients, not the per-sample state.
        optimizer.zero_grad(set_to_none=True)
        model.train()
        inputs = _with_position_ids(self._prepare_inputs(inputs), self.model)
        batch_size = int(inputs["input_ids"].shape[0])
        if batch_size == 0:
            # An empty Poisson batch: no per-sample gradient, the step adds noise only.
            for p in optimizer.params:
                if ghost:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            self.last_step_loss = float("nan")
            return torch.tensor(0.0, device=self.args.device)
        micro = self.args.per_device_train_batch_size
        chunks = [
            {key: value[start : start + micro] for key, value in inputs.items()}
            for start in range(0, batch_size, micro)
        ]
        total = 0.0
        # DDP must not average the raw (unclipped) gradients: the DP optimizer all-reduces the
        # clipped, noised sum itself.
        no_sync = getattr(model, "no_sync", None) if self.world_size > 1 else None
        for index, chunk in enumerate(chunks):
            with no_sync() if no_sync is not None else contextlib.nullcontext():
                with self.compute_loss_context_manager():
                    losses = self.per_example_losses(model, chunk)
                if ghost:
                    self._ghost_clipped_backward(losses, optimizer)
                else:
                    self.accelerator.backward(losses.sum())
                    _check_every_parameter_has(optimizer, "grad_sample")
            total += float(losses.detach().sum())
            if index < len(chunks) - 1:
                # Breakage 5: bank this micro-batch's clipped sum before the next backward.
                if ghost:
                    optimizer.accumulate()
                    for p in optimizer.params:
                        p.grad = None
                else:
                    optimizer.clip_and_accumulate()
                    for p in optimizer.params:
                        p.grad_sample = None
        self.last_step_loss = total / batch_size
        return torch.tensor(self.last_step_loss, device=self.args.device)

    def _ghost_clipped_backward(self, losses: torch.Tensor, optimizer: Any) -> None:
        """Two backward passes: per-example norms (hooks), then the clipped sum into ``p.grad``."""
        module = self.grad_sample_module
        for p in optimizer.params:
            p._norm_sample = None
        losses.sum().backward(retain_graph=True)
        _check_every_parameter_has(optimizer, "_norm_sample")
        coefficients = module.get_clipping_coef().detach()
        for p in optimizer.params:
            p.grad = None  # the unclipped sum must never reach the step
        module.disable_hooks()
        try:
            (coefficients.to(losses.device) * losses).sum().backward()
        finally:
            module.enable_hooks()

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> None:
        # Breakage 6: the pre-noise gradient norm is private; never compute it.
        return None

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        raise PrivacyViolationError("the Trainer's max_grad_norm must be off under DP-SGD")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Breakage 6 / PRIVACY 15: drop anything gradient-derived; the loss is labelled.
        logs = {key: value for key, value in logs.items() if "grad_norm" not in key}
        for key in ("loss", "train_loss"):
            if key in logs:
                logs[f"{key}_not_private"] = logs.pop(key)
        super().log(logs, start_time)


class DPTrainer(DPTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that trains with DP-SGD as ``privacy_args`` plans it.

    Usable from a notebook without the service::

        plan = service.privacy.plan_privacy(num_units=len(train), batch_size=64, epochs=3,
                                            target_epsilon=8.0)
        trainer = DPTrainer(model=model, args=TrainingArguments(output_dir="out",
                            per_device_train_batch_size=16), train_dataset=train,
                            data_collator=collator, privacy_args=PrivacyArguments.from_plan(plan))
        trainer.train()

    ``train_dataset`` items are whatever ``data_collator`` takes; the batches must hold
    ``input_ids`` and ``labels`` (-100 = ignored). See ``DPTrainerMixin`` for the arguments.
    """


def privatize_trainer(trainer_class: type[Trainer]) -> type[Trainer]:
    """The same DP-SGD behaviour for any ``Trainer`` subclass (TRL's ``SFTTrainer``, yours).

    The returned class puts ``DPTrainerMixin`` first in the method order, so the data loader,
    optimizer, loss and training step are the DP ones whatever the subclass overrides; its own
    dataset preparation and collator are kept. Preference trainers (DPO, KTO, ORPO, ...) are
    refused: their loss couples a chosen and a rejected sequence (and a reference model), so the
    per-example loss here would not be theirs, and a pair-level privacy unit needs its own
    sampler and loss; silently training something else would be worse than refusing.
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise EngineError(f"{trainer_class!r} is not a transformers.Trainer subclass")
    if issubclass(trainer_class, DPTrainerMixin):
        return trainer_class
    names = {klass.__name__ for klass in trainer_class.__mro__}
    preference = {"DPOTrainer", "KTOTrainer", "ORPOTrainer", "CPOTrainer", "RewardTrainer", "PPOTrainer"}
    if names & preference:
        raise EngineError(
            f"{trainer_class.__name__} trains on preference pairs; privatize_trainer supports trainers with a "
            "per-example token loss (Trainer, SFTTrainer)"
        )
    return type(f"DP{trainer_class.__name__}", (DPTrainerMixin, trainer_class), {})


def _make_args_private(args: TrainingArguments, privacy_args: PrivacyArguments) -> None:
    """Force the Trainer settings that DP-SGD needs (each one is a measured breakage)."""
    if args.gradient_accumulation_steps != 1:
        raise EngineError(
            "gradient_accumulation_steps must be 1: the logical batch is Poisson-sampled whole and "
            "per_device_train_batch_size is the physical micro-batch"
        )
    if args.max_steps not in (-1, 0, privacy_args.steps):
        raise EngineError(
            f"max_steps={args.max_steps} differs from the plan's {privacy_args.steps} steps; the plan is trained exactly"
        )
    if getattr(args, "padding_free", False):  # TRL's SFTConfig
        raise EngineError(
            "padding_free puts a batch's examples into one row, so per-example gradients (and the DP "
            "guarantee) are impossible; set padding_free=False"
        )
    args.max_steps = privacy_args.steps
    args.max_grad_norm = 0.0
    # Activation checkpointing runs each layer's forward twice for one backward: Opacus would never
    # complete a per-sample gradient. TRL's SFTConfig turns it on by default.
    checkpointing = [
        name for name in ("activation_checkpointing", "gradient_checkpointing") if getattr(args, name, False)
    ]
    if checkpointing:  # the second name is the first's alias until transformers 6
        logger.warning("activation checkpointing is not compatible with per-sample gradients; turned off")
        for name in checkpointing:
            setattr(args, name, False)
    # Resuming restores the sampler's state instead of replaying (and re-drawing) batches.
    args.ignore_data_skip = True
    args.remove_unused_columns = False
    args.dataloader_drop_last = False


def _empty_batches_allowed(collate: Callable[[list], Any], example: Any) -> Callable[[list], Any]:
    """An empty Poisson batch is a noise-only step (PRIVACY.md 3), but collators other than the
    engine's (TRL's, the Trainer's defaults) fail on an empty list. It becomes a real batch cut to
    size 0: the same keys as any other batch, so that data-parallel processes with and without
    examples still make the same collective calls (a batch without labels skips one and hangs)."""

    def collate_or_empty(examples: list) -> Any:
        if examples:
            return collate(examples)
        return {key: value[:0] for key, value in collate([example]).items()}

    return collate_or_empty


def _with_position_ids(inputs: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Give the batch (batch, length) ``position_ids`` when its collator did not (the engine's does).
    The values are the model's own default, 0..length-1; materialised per example, the position
    embedding gets a per-sample gradient with the batch's size instead of 1 (TRAINER-NOTES.md)."""
    input_ids = inputs.get("input_ids")
    if "position_ids" in inputs or input_ids is None or input_ids.shape[0] == 0:
        return inputs
    if "position_ids" not in inspect.signature(_unwrapped(model).forward).parameters:
        return inputs
    batch, length = input_ids.shape[:2]
    positions = torch.arange(length, dtype=torch.long, device=input_ids.device).expand(batch, length).contiguous()
    return {**inputs, "position_ids": positions}


def _turn_off_activation_checkpointing(model: nn.Module) -> None:
    """The same for a model that arrives with checkpointing already enabled on its layers."""
    if not any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules()):
        return
    logger.warning("activation checkpointing is not compatible with per-sample gradients; turned off")
    plain = _unwrapped(model)
    # `gradient_checkpointing_disable`: its name before transformers 5.x
    disable = getattr(plain, "activation_checkpointing_disable", None) or plain.gradient_checkpointing_disable
    disable()


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _refuse_unit_mixing_modules(model: nn.Module) -> None:
    """PRIVACY.md 8: batch statistics mix examples; per-sample gradients would be wrong."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise EngineError(f"module {name!r} ({type(module).__name__}) mixes examples; DP-SGD refuses it")


def _refuse_tied_trainable_parameters(model: nn.Module) -> None:
    """Ghost clipping computes one norm per module use; a parameter shared by two modules (GPT-2's
    tied embedding and output layer) would be clipped wrongly, so Opacus fails mid-step. Say so first."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(name)
    tied = [names for names in owners.values() if len(names) > 1]
    if tied:
        raise EngineError(
            f"grad_sample_mode='ghost' does not support tied trainable parameters ({tied[0]}); "
            "use LoRA or grad_sample_mode='hooks'"
        )


def _check_every_parameter_has(optimizer: Any, attribute: str) -> None:
    """PRIVACY.md 9: a trainable parameter without a per-sample gradient (or norm) would skip
    clipping; ``attribute`` is ``grad_sample`` (hooks) or ``_norm_sample`` (ghost)."""
    for p in optimizer.params:
        if getattr(p, attribute, None) is None:
            raise PrivacyViolationError(f"a trainable parameter of shape {tuple(p.shape)} got no per-sample gradient")


def latest_checkpoint(path: Path) -> Path | None:
    """The complete checkpoint with the most steps at or under ``path`` (itself, or its
    ``checkpoint-N`` folders, or those of its ``checkpoints`` folder); None if there is none."""
    if (path / DP_STATE_FILE).is_file():
        return path
    candidates = [*path.glob("checkpoint-*"), *path.glob("checkpoints/checkpoint-*")]
    complete = [c for c in candidates if (c / DP_STATE_FILE).is_file() and c.name.split("-")[-1].isdigit()]
    return max(complete, key=lambda c: int(c.name.split("-")[-1]), default=None)


def _dp_state_name(rank: int) -> str:
    """Process 0 writes ``dp_state.pt``; other data-parallel processes their own sampler state."""
    return DP_STATE_FILE if rank == 0 else f"dp_state.rank{rank}.pt"


def _load_dp_state(checkpoint: Path, privacy_args: PrivacyArguments, rank: int = 0) -> dict[str, Any]:
    """The checkpoint's DP state, refused if it was written for a different mechanism."""
    file = checkpoint / _dp_state_name(rank)
    if not file.is_file():
        raise EngineError(f"{checkpoint} is not a complete DP checkpoint (no {DP_STATE_FILE})")
    state = torch.load(file, weights_only=True)
    saved, current = state["privacy"], asdict(privacy_args)
    keys = (
        "noise_multiplier",
        "sampling_probability",
        "steps",
        "delta",
        "max_grad_norm",
        "unit",
        "accountant",
    )
    different = [key for key in keys if saved.get(key) != current.get(key)]
    if different:
        raise EngineError(f"checkpoint was trained with a different privacy mechanism ({different})")
    return state
