"""Records to tensors: tokenisation per task and the collator (PRIVACY.md 7).

The collator pads on the right, masks padding out of the loss with label -100, and puts
``position_ids`` of shape (batch, length) into every batch: models that build (1, length)
position ids themselves give the position embedding a per-sample gradient of batch size 1,
which breaks per-sample clipping (TRAINER-NOTES.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import EngineError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One tokenised record; ``labels`` is per token (LM, token tasks) or one class id."""

    input_ids: list[int]
    labels: list[int] | int


def build_label_map(records: Sequence[Mapping[str, Any]], label_field: str, per_token: bool) -> dict[Any, int]:
    """Class name to id, sorted so that the same label set always gives the same ids.

    The label set is read from the private data; it becomes part of the model head. Jobs that
    must not reveal a rare label should pass a public label list (documented limitation).
    """
    values: set[Any] = set()
    for index, record in enumerate(records):
        if label_field not in record:
            raise EngineError(f"record {index} has no label field {label_field!r}")
        value = record[label_field]
        values.update(value if per_token else [value])
    return {value: position for position, value in enumerate(sorted(values, key=str))}


def _frame(tokenizer: Any, ids: list[int]) -> list[int]:
    """BOS/EOS around ``ids`` when the tokenizer defines them and did not add them."""
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    if tokenizer.eos_token_id is not None and ids[-1] != tokenizer.eos_token_id:
        ids = [*ids, tokenizer.eos_token_id]
    return ids


def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    task: str,
    text_field: str,
    label_field: str | None,
    max_seq_length: int,
    label_map: Mapping[Any, int] | None = None,
) -> list[Example]:
    """Tokenise every record for ``task``; sequences are truncated to ``max_seq_length``."""
    examples = []
    for index, record in enumerate(records):
        if text_field not in record:
            raise EngineError(f"record {index} has no text field {text_field!r}")
        text = record[text_field]
        if task == "causal_lm":
            ids = _frame(tokenizer, tokenizer(str(text), add_special_tokens=False)["input_ids"])[:max_seq_length]
            examples.append(Example(ids, list(ids)))
        elif task == "sequence_classification":
            assert label_field is not None and label_map is not None
            ids = _frame(tokenizer, tokenizer(str(text), add_special_tokens=False)["input_ids"])[:max_seq_length]
            examples.append(Example(ids, label_map[record[label_field]]))
        elif task == "token_classification":
            assert label_field is not None and label_map is not None
            examples.append(_tokenize_words(tokenizer, text, record[label_field], label_map, max_seq_length, index))
        else:
            raise EngineError(f"unknown task {task!r}")
    return examples


def _tokenize_words(
    tokenizer: Any, words: Any, tags: Any, label_map: Mapping[Any, int], max_seq_length: int, index: int
) -> Example:
    """Words and their tags: the first sub-token of a word carries its tag, the rest -100."""
    if isinstance(words, str) or not isinstance(words, Sequence) or not isinstance(tags, Sequence):
        raise EngineError(f"record {index}: token classification needs a list of words and a list of tags")
    if len(words) != len(tags):
        raise EngineError(f"record {index}: {len(words)} words but {len(tags)} tags")
    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for position, (word, tag) in enumerate(zip(words, tags, strict=True)):
        pieces = tokenizer(("" if position == 0 else " ") + str(word), add_special_tokens=False)["input_ids"]
        ids.extend(pieces)
        labels.extend([label_map[tag]] + [IGNORE_INDEX] * (len(pieces) - 1))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(IGNORE_INDEX)
    return Example(ids[:max_seq_length], labels[:max_seq_length])


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


@dataclass
class DPCollator:
    """Right padding, -100 on padding, and (batch, length) ``position_ids``.

    An empty list gives tensors with batch size 0: an empty Poisson batch still goes through
    the trainer and takes a noise-only step (PRIVACY.md 3).
    """

    pad_token_id: int
    per_token_labels: bool
    include_position_ids: bool = True

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        length = max((len(example.input_ids) for example in examples), default=1)
        batch = len(examples)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = (
            torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
            if self.per_token_labels
            else torch.zeros((batch,), dtype=torch.long)
        )
        for row, example in enumerate(examples):
            size = len(example.input_ids)
            input_ids[row, :size] = torch.tensor(example.input_ids, dtype=torch.long)
            attention_mask[row, :size] = 1
            if self.per_token_labels:
                labels[row, :size] = torch.tensor(example.labels, dtype=torch.long)
            else:
                labels[row] = int(example.labels)  # type: ignore[arg-type]
        result = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.include_position_ids:
            result["position_ids"] = torch.arange(length, dtype=torch.long).expand(batch, length).contiguous()
        return result
