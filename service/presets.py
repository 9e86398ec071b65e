"""Built-in tiny model presets: pure data, listed by ``GET /v1/models``.

A preset is a model architecture with random weights drawn from a fixed seed, small enough
(0.1 to 0.5 M parameters) to train on a CPU in seconds, with the byte-level BPE tokenizer
shipped in ``worker/engine/assets/tokenizer.json``. The demo and the tests use them because
they need no network. The worker materialises a preset once into a local directory with
``save_pretrained`` and then loads it like any local path (``worker/engine/models.py``), so
presets exercise the same loading path as real models.

This module must stay importable without torch or transformers: the API imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Vocabulary of the shipped tokenizer; ids 0-4 are <pad>, <s>, </s>, <unk>, <mask>.
TOKENIZER_VOCAB_SIZE = 512
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2

TASKS = ("causal_lm", "sequence_classification", "token_classification")


@dataclass(frozen=True)
class ModelPreset:
    """One built-in model: what the API lists and what the worker builds."""

    name: str
    family: str
    tasks: tuple[str, ...]
    description: str
    #: ``transformers`` config as keyword arguments, ``model_type`` included.
    config: dict[str, Any] = field(default_factory=dict)
    #: Seed of the random initial weights: the same preset is the same model everywhere.
    seed: int = 0
    #: LoRA target modules that fit this architecture (the default when a job names none).
    lora_target_modules: tuple[str, ...] = ()

    def to_public_dict(self) -> dict[str, Any]:
        """The preset as ``GET /v1/models`` shows it."""
        return {
            "id": self.name,
            "object": "model",
            "source": "preset",
            "family": self.family,
            "tasks": list(self.tasks),
            "description": self.description,
            "lora_target_modules": list(self.lora_target_modules),
        }


_SPECIAL_IDS = {
    "vocab_size": TOKENIZER_VOCAB_SIZE,
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
}

PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="dpft/tiny-gpt2",
            family="gpt2",
            tasks=TASKS,
            description="GPT-2 decoder (Conv1D layers), 2 layers, width 64, random weights; for demos and tests.",
            config={
                "model_type": "gpt2",
                "n_embd": 64,
                "n_layer": 2,
                "n_head": 2,
                "n_positions": 256,
                "n_inner": 128,
                "tie_word_embeddings": True,
                **_SPECIAL_IDS,
            },
            seed=1234,
            lora_target_modules=("c_attn", "c_proj"),
        ),
        ModelPreset(
            name="dpft/tiny-llama",
            family="llama",
            tasks=TASKS,
            description="Llama-style decoder (RMSNorm, rotary embeddings, SwiGLU), 2 layers, width 64, "
            "random weights; for demos and tests.",
            config={
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "max_position_embeddings": 256,
                "tie_word_embeddings": False,
                **_SPECIAL_IDS,
            },
            seed=1234,
            lora_target_modules=("q_proj", "v_proj"),
        ),
        ModelPreset(
            name="dpft/tiny-bert",
            family="bert",
            tasks=("sequence_classification", "token_classification"),
            description="BERT-style encoder, 2 layers, width 64, random weights; for classification demos and tests.",
            config={
                "model_type": "bert",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "max_position_embeddings": 256,
                "type_vocab_size": 1,
                **_SPECIAL_IDS,
            },
            seed=1234,
            lora_target_modules=("query", "value"),
        ),
    )
}


def get_preset(name: str) -> ModelPreset | None:
    """The preset called ``name``, or None when ``name`` is not a built-in preset."""
    return PRESETS.get(name)


def list_presets() -> list[dict[str, Any]]:
    """All presets as the API lists them, in a stable order."""
    return [PRESETS[name].to_public_dict() for name in sorted(PRESETS)]
