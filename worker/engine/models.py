"""Model and tokenizer loading: local paths, hub ids, and the built-in presets, one path for all.

A preset (``service/presets.py``) is materialised once into a local directory with
``save_pretrained`` and from then on loaded with ``from_pretrained`` like any local model, so
that the demo and the tests exercise the loading code that real jobs use.
``trust_remote_code`` is always off: a job spec must not be able to run code on a worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from service.presets import ModelPreset, get_preset

from .errors import EngineError

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TOKENIZER_FILE = ASSETS_DIR / "tokenizer.json"

_AUTO_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "sequence_classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
}


def preset_cache_dir() -> Path:
    """Where presets are materialised: ``$DPFT_MODEL_CACHE`` or ``~/.cache/dpft/presets``."""
    configured = os.environ.get("DPFT_MODEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "dpft" / "presets"


def _preset_fingerprint(preset: ModelPreset) -> str:
    payload = json.dumps(
        {"config": preset.config, "seed": preset.seed, "tokenizer": TOKENIZER_FILE.read_bytes().hex()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def materialize_preset(preset: ModelPreset, cache_dir: Path | None = None) -> Path:
    """Write the preset's random-weight model and its tokenizer to a local directory, once.

    The directory name carries a fingerprint of the config, seed and tokenizer, so a changed
    preset never reuses stale weights. Writing goes to a temporary directory that is renamed
    into place, so concurrent workers never see a half-written model.
    """
    root = cache_dir or preset_cache_dir()
    target = root / f"{preset.name.replace('/', '--')}-{_preset_fingerprint(preset)}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    config_kwargs = dict(preset.config)
    config = AutoConfig.for_model(config_kwargs.pop("model_type"), **config_kwargs)
    # Random weights from the preset's own seed, without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        if preset.family == "bert":
            from transformers import AutoModel

            model = AutoModel.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        model.save_pretrained(staging)
        _preset_tokenizer().save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process won the race; its copy is identical.
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("materialised preset", extra={"preset": preset.name, "path": str(target)})
    return target


def _preset_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
    )


def resolve_model_path(base_model: str) -> str:
    """A preset name becomes its materialised directory; anything else is passed on unchanged."""
    preset = get_preset(base_model)
    if preset is not None:
        return str(materialize_preset(preset))
    return base_model


def load_tokenizer(base_model: str) -> Any:
    """The model's tokenizer, with a pad token (decoders often lack one: EOS stands in)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(base_model), trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise EngineError(f"tokenizer of {base_model!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    base_model: str, task: str, *, num_labels: int | None = None, pad_token_id: int | None = None
) -> PreTrainedModel:
    """Load ``base_model`` for ``task`` in float32 on the CPU (the Trainer moves it).

    The model is built in float32: per-sample gradients and clipping are computed in the
    parameters' dtype, and half precision norms would blur the clipping bound.
    """
    if task not in _AUTO_CLASSES:
        raise EngineError(f"unknown task {task!r}; expected one of {sorted(_AUTO_CLASSES)}")
    preset = get_preset(base_model)
    if preset is not None and task not in preset.tasks:
        raise EngineError(f"preset {base_model!r} does not support task {task!r}")
    kwargs: dict[str, Any] = {"trust_remote_code": False, "dtype": torch.float32}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if pad_token_id is not None and task != "causal_lm":
        kwargs["pad_token_id"] = pad_token_id
    model = _AUTO_CLASSES[task].from_pretrained(resolve_model_path(base_model), **kwargs)
    return model
