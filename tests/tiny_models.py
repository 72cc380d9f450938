"""Tiny random transformer folders for tests: load like any hugging-face model, offline and in milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a an is are was what how many much who where when why which of to in on for with and or not "
    "cat dog sat mat bird fish tree car road city river sun moon star water fire earth "
    "one two three four five six seven eight nine ten plus minus times equals number answer "
    "capital france paris germany berlin price cost model query question solve write code"
).split()
TINY_MAX_POSITIONS = 64
"""Position embeddings of the tiny model: encoders over it need `max_length` at most this."""


def tiny_encoder_dir(path: str | Path, seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide random BERT (weights fixed by `seed`) and a word-level tokenizer to `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL_TOKENS + WORDS) + "\n")
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=TINY_MAX_POSITIONS,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(path)
    BertTokenizerFast.from_pretrained(path).save_pretrained(path)  # reads vocab.txt (any transformers version)
    return path
