"""Regenerate the tokenizer shipped with the built-in tiny presets.

The presets (see ``service/presets.py``) must run with no network, so their tokenizer is a
small byte-level BPE trained here on ``corpus.txt`` (a few kilobytes of text written for this
project). Byte-level means any input text encodes without unknown tokens, whatever the corpus.

    python -m worker.engine.assets.build_tokenizer   # rewrites tokenizer.json beside this file

The output is deterministic for a given ``tokenizers`` version; commit the result.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ASSETS_DIR = Path(__file__).resolve().parent
CORPUS = ASSETS_DIR / "corpus.txt"
OUTPUT = ASSETS_DIR / "tokenizer.json"

#: Special tokens, in id order. ``service/presets.py`` relies on these ids and on VOCAB_SIZE.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
VOCAB_SIZE = 512


def build(corpus: Path = CORPUS) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus)], trainer)
    # Every encoded sequence is framed as <s> ... </s>: the encoder presets pool the first token,
    # the decoder presets learn where a record ends.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", 1), ("</s>", 2)],
    )
    return tokenizer


def main() -> None:
    tokenizer = build()
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id
    tokenizer.save(str(OUTPUT))


if __name__ == "__main__":
    main()
