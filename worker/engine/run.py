"""``train()``: what the Celery task calls; a thin driver of ``DPTrainer`` (one implementation)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

from .config import TrainingConfig
from .data import DPCollator, ExampleDataset, build_label_map, tokenize_records
from .errors import EngineError
from .models import load_model, load_tokenizer
from .sampling import group_records_by_entity
from .trainer import DPTrainer, EpsilonFn, StepReport, latest_checkpoint

logger = logging.getLogger(__name__)

#: Logical steps between checkpoints when the caller does not say.
DEFAULT_CHECKPOINT_EVERY = 50
#: Below this many parameters a CPU run uses one thread (see ``_cpu_threads_for``).
TINY_MODEL_PARAMETERS = 5_000_000


@dataclass(frozen=True)
class TrainingOutcome:
    """The result of ``train``.

    ``stop_reason`` is ``"completed"`` (all planned steps), ``"epsilon_budget"`` (the next step
    would have exceeded the target epsilon) or ``"cancelled"`` (``should_stop`` said so).
    ``adapter_dir`` holds the PEFT adapter alone for LoRA jobs, the full model otherwise.
    ``final_loss`` is the last step's training loss: NOT covered by DP (see ``StepReport``).
    """

    steps: int
    epsilon: float
    stop_reason: str
    adapter_dir: Path
    final_loss: float
    noise_source: str


def _never() -> bool:
    return False


def train(
    config: TrainingConfig,
    records: Sequence[Mapping[str, Any]],
    output_dir: Path,
    on_step: Callable[[StepReport], None] | None = None,
    should_stop: Callable[[], bool] = _never,
    resume_from: Path | None = None,
    *,
    epsilon_fn: EpsilonFn | None = None,
    checkpoint_every: int | None = DEFAULT_CHECKPOINT_EVERY,
    checkpoint_on_stop: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainingOutcome:
    """Train ``config`` on ``records`` with DP-SGD and save the result under ``output_dir``.

    Epsilon comes from ``service.privacy.EpsilonTracker`` for ``config.privacy`` (the plan's
    mechanism); ``epsilon_fn`` replaces it (tests). ``on_step`` is called after every logical step, ``should_stop`` before
    every next one (cooperative cancel).

    Checkpoints go to ``output_dir/checkpoints/checkpoint-N`` every ``checkpoint_every`` steps
    and at the end (None: none). ``resume_from`` (a checkpoint, or a directory holding them,
    such as a previous ``output_dir``) continues from its latest complete checkpoint: weights,
    optimizer, scheduler, the noisy-step count (epsilon continues, PRIVACY.md 14) and the
    sampler's state. Steps after that checkpoint whose results were lost are re-run; nothing
    computed from them under DP survives, so they are not counted again. A ``resume_from``
    without any complete checkpoint starts from scratch. ``checkpoint_on_stop`` also saves one
    at the step where ``should_stop`` stopped training (needs ``checkpoint_every``).
    ``callbacks`` are extra ``TrainerCallback``s, run after the engine's own.
    """
    output_dir = Path(output_dir)
    trainer = build_trainer(
        config,
        records,
        output_dir,
        on_step=on_step,
        should_stop=should_stop,
        epsilon_fn=epsilon_fn,
        checkpoint_every=checkpoint_every,
    )
    trainer.checkpoint_on_stop = checkpoint_on_stop
    for callback in callbacks:
        trainer.add_callback(callback)
    checkpoint = latest_checkpoint(Path(resume_from)) if resume_from is not None else None
    if resume_from is not None and checkpoint is None:
        logger.warning("no complete checkpoint under %s; starting from scratch", resume_from)
    tokenizer = trainer.processing_class
    privacy = config.privacy
    with _cpu_threads_for(trainer.model):
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    steps = trainer.noisy_steps
    stop_reason = trainer.stop_reason or ("completed" if steps >= privacy.steps else "cancelled")
    adapter_dir = output_dir / ("adapter" if config.lora is not None else "model")
    # The plain model (never the Opacus wrapper): a LoRA job writes the PEFT adapter alone.
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(str(adapter_dir))
        if config.lora is None:
            tokenizer.save_pretrained(str(adapter_dir))
    final_loss = trainer.step_reports[-1].loss if trainer.step_reports else float("nan")
    outcome = TrainingOutcome(
        steps=steps,
        epsilon=trainer.epsilon_after(steps),
        stop_reason=stop_reason,
        adapter_dir=adapter_dir,
        final_loss=final_loss,
        noise_source=trainer.noise_random.description,
    )
    logger.info(
        "training finished",
        extra={
            "job_id": config.job_id,
            "steps": steps,
            "epsilon": outcome.epsilon,
            "stop_reason": stop_reason,
        },
    )
    return outcome


def build_trainer(
    config: TrainingConfig,
    records: Sequence[Mapping[str, Any]],
    output_dir: Path,
    *,
    on_step: Callable[[StepReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    epsilon_fn: EpsilonFn | None = None,
    checkpoint_every: int | None = None,
) -> DPTrainer:
    """The ``DPTrainer`` that ``train`` runs: data tokenised, model loaded (with LoRA), units grouped."""
    if not records:
        raise EngineError("the dataset is empty")
    output_dir.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    hyper = config.hyperparameters
    privacy = config.privacy
    set_seed(hyper.seed)

    tokenizer = load_tokenizer(config.base_model)
    label_map = None
    if config.task != "causal_lm":
        assert config.label_field is not None
        label_map = build_label_map(records, config.label_field, per_token=config.task == "token_classification")
    examples = tokenize_records(
        records,
        tokenizer,
        task=config.task,
        text_field=config.text_field,
        label_field=config.label_field,
        max_seq_length=hyper.max_seq_length,
        label_map=label_map,
    )
    if privacy.unit == "entity":
        assert privacy.entity_column is not None
        units = group_records_by_entity([record.get(privacy.entity_column) for record in records])
    else:
        units = [[index] for index in range(len(records))]

    model = load_model(
        config.base_model,
        config.task,
        num_labels=len(label_map) if label_map is not None else None,
        pad_token_id=tokenizer.pad_token_id,
    )
    if label_map is not None:
        model.config.id2label = {index: str(label) for label, index in label_map.items()}
        model.config.label2id = {str(label): index for label, index in label_map.items()}
    model = _apply_lora(model, config)

    micro_batch_size = hyper.micro_batch_size or max(1, math.ceil(hyper.batch_size * 1.5))
    args = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=1,
        max_steps=privacy.steps,
        learning_rate=hyper.learning_rate,
        weight_decay=hyper.weight_decay,
        lr_scheduler_type=hyper.lr_scheduler_type,
        warmup_steps=hyper.warmup_steps,
        seed=hyper.seed,
        logging_strategy="no",
        save_strategy="steps" if checkpoint_every else "no",
        save_steps=checkpoint_every or 500,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    if privacy.expected_batch_size is None:
        privacy.expected_batch_size = float(hyper.batch_size)
    trainer = DPTrainer(
        model=model,
        args=args,
        privacy_args=privacy,
        train_dataset=ExampleDataset(examples),
        units=units,
        task=config.task,
        data_collator=DPCollator(
            pad_token_id=tokenizer.pad_token_id,
            per_token_labels=config.task != "sequence_classification",
        ),
        epsilon_fn=epsilon_fn,
        on_step=on_step,
        should_stop=should_stop,
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)  # library code logs, it does not print
    return trainer


@contextlib.contextmanager
def _cpu_threads_for(model: Any) -> Iterator[None]:
    """One intra-op thread for tiny models on the CPU, restored afterwards.

    Measured on the 2-core CI machine with another process busy: 10 steps of the tiny GPT-2
    preset took 0.78 s with one thread and 6.2 s with two (threads fight over the busy core;
    the matrices are too small to gain from splitting).
    """
    tiny = sum(p.numel() for p in model.parameters()) < TINY_MODEL_PARAMETERS
    if torch.cuda.is_available() or not tiny:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _apply_lora(model: Any, config: TrainingConfig) -> Any:
    if config.lora is None:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    from service.presets import get_preset

    target_modules = config.lora.target_modules
    if target_modules is None:
        preset = get_preset(config.base_model)
        if preset is not None:
            target_modules = list(preset.lora_target_modules)
    task_type = {
        "causal_lm": TaskType.CAUSAL_LM,
        "sequence_classification": TaskType.SEQ_CLS,
        "token_classification": TaskType.TOKEN_CLS,
    }[config.task]
    lora_config = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, lora_config)
