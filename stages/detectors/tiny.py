"""Tiny randomly initialized detectors built from configs, saved as real model folders.

No weights can be downloaded on the development machines, so tests and benchmarks build models from
configs and save them where the backends load them from, so the real loading and inference code runs:
a BERT folder for the official GroundingDINO's `text_encoder_type`, and transformers
GroundingDINO / OWLv2 directories (config, weights, tokenizer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

WORDS = ("a", "an", "the", "dog", "dogs", "cat", "cats", "field", "flowers", "red", "big", "small", "ball",
         "man", "woman", "tree", "car", "on", "in", "of", "and", "with", "green", "grass", "sky", "blue",
         "##s", "##ing", "house", "bike", "table", "cup")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_bert_vocab(folder: str | os.PathLike, words=WORDS) -> Path:
    """A BERT WordPiece vocab folder: special tokens, '.', '?', the letters (so any word tokenizes) and
    `words`. Load it with `from_pretrained(folder)` (a `vocab_file=` keyword can be silently ignored)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = list(SPECIALS) + [".", "?", ",", "-", "'"] + [w for w in words if w not in letters] + letters
    vocab += ["##" + c for c in letters]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return folder


def _bert_config(vocab_size: int, hidden: int = 32, layers: int = 1):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=512)


def tiny_bert(folder: str | os.PathLike, seed: int = 0) -> str:
    """A tiny random BERT (model + tokenizer) folder: the official GroundingDINO's text encoder."""
    import torch
    from transformers import BertModel, BertTokenizerFast

    folder = write_bert_vocab(folder)
    tok = BertTokenizerFast.from_pretrained(str(folder))
    torch.manual_seed(seed)
    BertModel(_bert_config(tok.vocab_size)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def hf_grounding_dino(folder: str | os.PathLike, *, d_model: int = 32, num_queries: int = 30,
                      decoder_layers: int = 2, full_size: bool = False, seed: int = 0) -> str:
    """A random transformers GroundingDINO folder. `full_size`: grounding-dino-tiny's architecture
    (Swin-T, BERT-base, 6+6 layers, 900 queries) for benchmarks; otherwise a tiny one for tests
    (at least 2 decoder layers: fewer breaks the model)."""
    import torch
    from transformers import (
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        SwinConfig,
    )

    folder = write_bert_vocab(folder)
    tok = BertTokenizerFast.from_pretrained(str(folder))
    if full_size:
        from transformers import BertConfig

        config = GroundingDinoConfig(text_config=BertConfig())
    else:
        config = GroundingDinoConfig(
            backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7,
                                       out_indices=[2, 3, 4]),
            text_config=_bert_config(tok.vocab_size), d_model=d_model, encoder_layers=1,
            decoder_layers=max(2, decoder_layers), encoder_ffn_dim=d_model * 2, decoder_ffn_dim=d_model * 2,
            encoder_attention_heads=2, decoder_attention_heads=2, num_queries=num_queries)
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def write_clip_vocab(folder: str | os.PathLike) -> Path:
    """A byte-level BPE vocab with no merges (every character is a token): enough for a CLIP tokenizer."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(["!"] + [c for c in chars if c != "!"] + [c + "</w>" for c in chars]
                                         + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def hf_owlv2(folder: str | os.PathLike, *, image_size: int = 64, seed: int = 0) -> str:
    """A tiny random transformers OWLv2 folder (patch 16: image_size 64 gives 16 boxes per image)."""
    import torch
    from transformers import CLIPTokenizerFast, Owlv2Config, Owlv2ForObjectDetection

    folder = write_clip_vocab(folder)
    tok = CLIPTokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                            pad_token="!")
    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1}
    config = Owlv2Config(text_config={**small, "vocab_size": len(tok), "max_position_embeddings": 16},
                         vision_config={**small, "image_size": image_size, "patch_size": 16},
                         projection_dim=32)
    torch.manual_seed(seed)
    Owlv2ForObjectDetection(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)
