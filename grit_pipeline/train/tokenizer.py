"""A tokenizer that needs no hub: byte-level BPE (trained with `tokenizers` on the shards' captions, or
bytes only), extended with the Kosmos-2 tag tokens and the 1,024 location tokens.

The tags and location tokens take the first ids in `vocab.SPECIAL_TOKENS` order, so a location index maps
to `vocab.LOCATION_OFFSET + index` in every tokenizer this module builds. It is saved as `tokenizer.json`
beside each checkpoint and loaded from there, never rebuilt on resume.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import fsspec
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from grit_pipeline.train import vocab

# DataLoader workers fork after the tokenizer exists; the Rust thread pool must not be used across a fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _finish(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(vocab.SPECIAL_TOKENS))
    return tok


class GroundedTokenizer:
    """Text <-> ids with the tag and location tokens atomic and at fixed ids."""

    def __init__(self, tok: Tokenizer):
        for i, t in enumerate(vocab.SPECIAL_TOKENS):
            if tok.token_to_id(t) != i:
                raise ValueError(f"tokenizer maps {t!r} to {tok.token_to_id(t)}, expected {i}: "
                                 "not built by grit_pipeline.train.tokenizer")
        self._tok = tok
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.image_start_id, self.image_end_id, self.image_pad_id = 3, 4, 5
        self.grounding_id, self.phrase_start_id, self.phrase_end_id = 6, 7, 8
        self.object_start_id, self.object_end_id, self.delimiter_id = 9, 10, 11
        self.location_offset = vocab.LOCATION_OFFSET

    # --- construction ----------------------------------------------------------------------------------
    @classmethod
    def byte_level(cls) -> GroundedTokenizer:
        """Bytes only (no merges): no training data needed, longest sequences."""
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        table = {t: i for i, t in enumerate(vocab.SPECIAL_TOKENS)}
        table.update({ch: len(table) + j for j, ch in enumerate(alphabet)})
        return cls(_finish(Tokenizer(models.BPE(vocab=table, merges=[]))))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> GroundedTokenizer:
        """Byte-level BPE trained on `texts` (plain captions); `vocab_size` counts the special tokens too."""
        floor = len(vocab.SPECIAL_TOKENS) + 256
        if vocab_size < floor:
            raise ValueError(f"vocab_size must be at least {floor} (special tokens + 256 bytes)")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(vocab.SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(_finish(tok))

    # --- persistence -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> GroundedTokenizer:
        return cls(Tokenizer.from_str(text))

    def save(self, path: str) -> None:
        with fsspec.open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> GroundedTokenizer:
        with fsspec.open(path, "r") as f:
            return cls.from_json(f.read())

    # --- use -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def location_id(self, index: int) -> int:
        return self.location_offset + index

    def is_location(self, token_id: int) -> bool:
        return self.location_offset <= token_id < self.location_offset + vocab.NUM_LOCATION_TOKENS
