"""The trainer's fixed vocabulary: Kosmos-2 tag tokens and the 1,024 location tokens, in id order.

The grounded text itself comes ready-made in each GrIT row's `grounded_caption`; the trainer only has to
know which pieces are atomic tokens. Boxes <-> location indices are `schemas.location`'s (P = 32,
index = row * 32 + col, `unilm` encoder, bin-centre / whole-cell decoder), re-exported here.
"""

from __future__ import annotations

from schemas.grounded_text import DELIMITER, GROUNDING, OBJECT_CLOSE, OBJECT_OPEN, PHRASE_CLOSE, PHRASE_OPEN
from schemas.location import NUM_LOCATION_TOKENS, P, all_location_tokens, decode_box, encode_box

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IMAGE_START, IMAGE_END, IMAGE_PAD = "<image>", "</image>", "<image_pad>"

# Order fixes the ids: tags first, then the location tokens, so location id = LOCATION_OFFSET + index.
TAG_TOKENS = (PAD, BOS, EOS, IMAGE_START, IMAGE_END, IMAGE_PAD, GROUNDING, PHRASE_OPEN, PHRASE_CLOSE,
              OBJECT_OPEN, OBJECT_CLOSE, DELIMITER)
LOCATION_OFFSET = len(TAG_TOKENS)
LOCATION_TOKENS = tuple(all_location_tokens())
SPECIAL_TOKENS = TAG_TOKENS + LOCATION_TOKENS

__all__ = ["P", "NUM_LOCATION_TOKENS", "TAG_TOKENS", "LOCATION_OFFSET", "LOCATION_TOKENS", "SPECIAL_TOKENS",
           "encode_box", "decode_box", "BOS", "EOS", "PAD", "IMAGE_START", "IMAGE_END", "IMAGE_PAD"]
