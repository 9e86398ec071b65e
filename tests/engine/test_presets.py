"""Built-in presets: pure data for the API, the same loading path as real models for the worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.presets import PRESETS, list_presets

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_the_preset_registry_imports_without_torch() -> None:
    code = "import sys, service.presets; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_listing_is_what_the_api_shows() -> None:
    listed = list_presets()
    assert [item["id"] for item in listed] == sorted(PRESETS)
    assert {"dpft/tiny-gpt2", "dpft/tiny-llama", "dpft/tiny-bert"} <= set(PRESETS)
    assert all(item["object"] == "model" and item["tasks"] and item["description"] for item in listed)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_materialise_once_and_load_like_a_local_path(name: str) -> None:
    from worker.engine.models import load_model, load_tokenizer, resolve_model_path

    path = Path(resolve_model_path(name))
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert resolve_model_path(name) == str(path)  # materialised once, reused
    preset = PRESETS[name]
    task = preset.tasks[0]
    tokenizer = load_tokenizer(name)
    model = load_model(name, task, num_labels=2 if task != "causal_lm" else None)
    assert model.config.vocab_size == len(tokenizer) == 512
    parameters = sum(p.numel() for p in model.parameters())
    assert 100_000 <= parameters <= 500_000
    # Random weights from the preset's seed: the same model every time.
    again = load_model(name, task, num_labels=2 if task != "causal_lm" else None)
    first = dict(model.named_parameters())
    for key, value in again.named_parameters():
        if "classifier" not in key and "score" not in key:
            assert value.equal(first[key]), key
