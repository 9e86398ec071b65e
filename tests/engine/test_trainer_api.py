"""``DPTrainer`` from a notebook, ``PrivacyArguments`` from a command line, ``privatize_trainer``."""

from __future__ import annotations

from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import HfArgumentParser, Trainer, TrainingArguments

from service.privacy import plan_privacy
from worker.engine import DPTrainer, EngineError, PrivacyArguments, privatize_trainer
from worker.engine.data import DPCollator, ExampleDataset, tokenize_records
from worker.engine.models import load_model, load_tokenizer

pytestmark = pytest.mark.unit


def _parts(lm_records):
    tokenizer = load_tokenizer("dpft/tiny-gpt2")
    examples = tokenize_records(
        lm_records(40), tokenizer, task="causal_lm", text_field="text", label_field=None, max_seq_length=16
    )
    model = get_peft_model(
        load_model("dpft/tiny-gpt2", "causal_lm"), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
    )
    collator = DPCollator(pad_token_id=tokenizer.pad_token_id, per_token_labels=True)
    return model, ExampleDataset(examples), collator


def _short_run(trainer_class: type, parts: tuple, tmp_path: Path, steps: int) -> Trainer:
    """A DP trainer of ``trainer_class`` for ``steps`` noisy steps on ``_parts``, epsilon not computed."""
    model, dataset, collator = parts
    return trainer_class(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none"),
        train_dataset=dataset,
        data_collator=collator,
        privacy_args=PrivacyArguments(noise_multiplier=1.0, sampling_probability=0.2, steps=steps, delta=1e-3),
        epsilon_fn=float,
    )


def test_notebook_use_trains_the_plan_with_the_service_accountant(tmp_path: Path, lm_records) -> None:
    model, dataset, collator = _parts(lm_records)
    plan = plan_privacy(num_units=len(dataset), batch_size=8, max_steps=6, target_epsilon=5.0, target_delta=1e-3)
    trainer = DPTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none"),
        train_dataset=dataset,
        data_collator=collator,
        privacy_args=PrivacyArguments.from_plan(plan, max_grad_norm=0.5),
    )
    trainer.train()
    assert trainer.noisy_steps == plan.steps == 6
    assert trainer.epsilon_after(trainer.noisy_steps) == pytest.approx(plan.epsilon, abs=1e-12)
    assert trainer.epsilon_after(trainer.noisy_steps) <= 5.0
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_privacy_arguments_parse_from_a_command_line() -> None:
    (parsed,) = HfArgumentParser(PrivacyArguments).parse_args_into_dataclasses(
        args=[
            "--noise_multiplier",
            "1.1",
            "--sampling_probability",
            "0.01",
            "--steps",
            "300",
            "--delta",
            "1e-6",
            "--clipping",
            "per_layer",
            "--target_epsilon",
            "4",
        ]  # fmt: skip
    )
    assert (parsed.noise_multiplier, parsed.steps, parsed.clipping, parsed.target_epsilon) == (1.1, 300, "per_layer", 4)
    assert parsed.secure_mode is True


def test_privatize_trainer_gives_a_subclass_the_dp_loop(tmp_path: Path, lm_records) -> None:
    class CustomTrainer(Trainer):
        def compute_loss(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            raise AssertionError("the non-private loss must not be used")

    private_class = privatize_trainer(CustomTrainer)
    assert issubclass(private_class, CustomTrainer) and private_class.__name__ == "DPCustomTrainer"
    trainer = _short_run(private_class, _parts(lm_records), tmp_path, steps=3)
    trainer.train()
    assert trainer.noisy_steps == 3


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_privatize_trainer_makes_trl_sft_trainer_private(tmp_path: Path, lm_records, lora: bool) -> None:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    plan = plan_privacy(num_units=40, batch_size=6, max_steps=4, target_epsilon=5.0, target_delta=1e-3)
    config = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_length=16, report_to="none", use_cpu=True
    )
    assert config.activation_checkpointing, "SFTConfig's default, which per-sample gradients cannot use"
    trainer = privatize_trainer(SFTTrainer)(
        model=load_model("dpft/tiny-gpt2", "causal_lm"),
        args=config,
        train_dataset=Dataset.from_list(lm_records(40)),
        processing_class=load_tokenizer("dpft/tiny-gpt2"),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]) if lora else None,
        privacy_args=PrivacyArguments.from_plan(plan, max_grad_norm=0.5),
    )
    assert not trainer.args.activation_checkpointing
    # TRL's collator fails on an empty list; an empty Poisson batch must still be a (noise-only) step.
    assert trainer.get_train_dataloader().collate_fn([])["input_ids"].shape[0] == 0
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()  # each step checks that every trainable parameter got a per-sample gradient
    assert trainer.noisy_steps == plan.steps == 4
    assert trainer.epsilon_after(trainer.noisy_steps) == pytest.approx(plan.epsilon, abs=1e-12)
    after = dict(trainer.model.named_parameters())
    changed = {name for name, p in after.items() if not torch.equal(p.detach(), before[name])}
    assert changed == {name for name, p in after.items() if p.requires_grad}
    assert any("lora_" in name for name in changed) == lora


def test_a_model_with_activation_checkpointing_on_still_gets_per_sample_gradients(tmp_path: Path, lm_records) -> None:
    parts = _parts(lm_records)
    model = parts[0]
    model.get_base_model().activation_checkpointing_enable()
    trainer = _short_run(DPTrainer, parts, tmp_path, steps=2)
    assert not model.get_base_model().is_activation_checkpointing
    trainer.train()  # with checkpointing on, the first step fails its per-sample gradient check
    assert trainer.noisy_steps == 2


def test_privatize_trainer_refuses_sft_padding_free_rows(tmp_path: Path, lm_records) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with pytest.raises(EngineError, match="padding_free"):
        privatize_trainer(SFTTrainer)(
            model=load_model("dpft/tiny-gpt2", "causal_lm"),
            args=SFTConfig(output_dir=str(tmp_path), padding_free=True, report_to="none", use_cpu=True),
            train_dataset=Dataset.from_list(lm_records(8)),
            processing_class=load_tokenizer("dpft/tiny-gpt2"),
            privacy_args=PrivacyArguments(noise_multiplier=1.0, sampling_probability=0.5, steps=2, delta=1e-3),
        )


def test_privatize_trainer_refuses_preference_trainers() -> None:
    class DPOTrainer(Trainer):
        pass

    with pytest.raises(EngineError, match="preference"):
        privatize_trainer(DPOTrainer)
    with pytest.raises(EngineError):
        privatize_trainer(object)  # type: ignore[arg-type]


def test_modules_that_mix_examples_are_refused() -> None:
    """PRIVACY.md 8: batch norm shares statistics across a batch; per-sample gradients would lie."""
    from torch import nn

    from worker.engine.trainer import _refuse_unit_mixing_modules

    _refuse_unit_mixing_modules(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    with pytest.raises(EngineError, match="mixes examples"):
        _refuse_unit_mixing_modules(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
