"""Every preset, task and LoRA/full combination gets exact per-example gradients.

Per-example gradients from the trainer (padded batch, Opacus hooks, per-example loss) are compared
with single-example backward passes on an unpadded copy of the model. This pins PRIVACY.md 7
(padding and -100 labels contribute nothing), 8 (no mixing between examples: attention masks,
rotary positions, the (batch, length) ``position_ids``) and 9 (every trainable parameter, the
tied GPT-2 embedding and the classification heads included, has a per-example gradient).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from worker.engine import Hyperparameters, PrivacyArguments, TrainingConfig
from worker.engine.run import build_trainer

pytestmark = pytest.mark.unit

TEXTS = [
    "hi",
    "the customer called on Monday about the invoice",
    "please reset your password using the link we sent to your email",
    "ok thanks",
    "the train was delayed by forty minutes",
]
WORDS = [text.split() for text in TEXTS]

RECORDS = {
    "causal_lm": ([{"text": text} for text in TEXTS], "text", None),
    "sequence_classification": (
        [{"text": text, "label": ["neg", "pos", "neutral"][i % 3]} for i, text in enumerate(TEXTS)],
        "text",
        "label",
    ),
    "token_classification": (
        [{"words": words, "tags": ["O" if j % 2 else "X" for j in range(len(words))]} for words in WORDS],
        "words",
        "tags",
    ),
}

COMBINATIONS = [
    ("dpft/tiny-gpt2", "causal_lm", False),
    ("dpft/tiny-llama", "causal_lm", True),
    ("dpft/tiny-llama", "causal_lm", False),
    ("dpft/tiny-bert", "sequence_classification", True),
    ("dpft/tiny-bert", "sequence_classification", False),
    ("dpft/tiny-bert", "token_classification", True),
    ("dpft/tiny-gpt2", "sequence_classification", True),
    ("dpft/tiny-llama", "token_classification", False),
]


def _trainer(tmp_path: Path, base_model: str, task: str, lora: bool, mode: str = "hooks"):
    records, text_field, label_field = RECORDS[task]
    config = TrainingConfig(
        base_model=base_model,
        task=task,  # type: ignore[arg-type]
        text_field=text_field,
        label_field=label_field,
        privacy=PrivacyArguments(
            noise_multiplier=0.0,
            sampling_probability=0.5,
            steps=10,
            delta=1e-3,
            secure_mode=False,
            grad_sample_mode=mode,
            expected_batch_size=4,
        ),
        hyperparameters=Hyperparameters(batch_size=4, micro_batch_size=8, max_seq_length=32),
    )
    if not lora:
        config.lora = None
    trainer = build_trainer(config, records, tmp_path, epsilon_fn=float)
    for module in trainer.model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    reference = copy.deepcopy(trainer.model)
    trainer.create_optimizer()
    return trainer, reference


@pytest.mark.parametrize(("base_model", "task", "lora"), COMBINATIONS)
def test_per_example_gradients_are_exact(
    tmp_path: Path, independent_gradient, base_model: str, task: str, lora: bool
) -> None:
    trainer, reference = _trainer(tmp_path, base_model, task, lora)
    examples = list(trainer.train_dataset)
    batch = trainer.data_collator(examples)
    assert batch["position_ids"].shape == batch["input_ids"].shape
    trainer.training_step(trainer.model, batch)

    names = {id(p): name for name, p in trainer.model.named_parameters()}
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert len(trainer.dp_optimizer.params) == len(trainable)
    if lora:
        assert all("lora_" in name or "modules_to_save" in name for name in trainable)
    for i, example in enumerate(examples):
        expected = independent_gradient(reference, example, task)
        for p in trainer.dp_optimizer.params:
            torch.testing.assert_close(p.grad_sample[i], expected[names[id(p)]], rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize(
    ("base_model", "task", "lora"),
    [
        ("dpft/tiny-llama", "causal_lm", False),
        ("dpft/tiny-bert", "sequence_classification", False),
        ("dpft/tiny-gpt2", "causal_lm", True),
    ],
)
def test_ghost_clipping_gives_the_clipped_sum_by_definition(
    tmp_path: Path, independent_gradient, base_model: str, task: str, lora: bool
) -> None:
    trainer, reference = _trainer(tmp_path, base_model, task, lora, mode="ghost")
    examples = list(trainer.train_dataset)
    singles = [independent_gradient(reference, example, task) for example in examples]
    norms = [sum(float(g.pow(2).sum()) for g in single.values()) ** 0.5 for single in singles]
    clip = sorted(norms)[len(norms) // 2]
    trainer.dp_optimizer.max_grad_norm = clip
    trainer.grad_sample_module.max_grad_norm = clip
    trainer.training_step(trainer.model, trainer.data_collator(examples))
    assert trainer.dp_optimizer.pre_step()
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    for p in trainer.dp_optimizer.params:
        name = names[id(p)]
        expected = sum(min(1.0, clip / n) * g[name] for g, n in zip(singles, norms, strict=True)) / 4
        torch.testing.assert_close(p.grad, expected, rtol=2e-4, atol=2e-6)
