"""Grounded-caption text formats: Kosmos-2 tags and the Markdown-link view (builders and parsers).

(Being written; `unsafe_caption_reason` is the stable entry point the chunks stage uses.)
"""

from __future__ import annotations

import re

# Anything tag-shaped: transformers' Kosmos-2 post-processing deletes every `<...>` it finds
# (`re.sub("<.*?>", "", text)`), so a caption holding one cannot survive a build -> parse round trip.
_TAG_LIKE = re.compile(r"<[^<>]*>")


def unsafe_caption_reason(caption: str) -> str | None:
    """None when `caption` can be written in the grounded formats and parsed back unchanged; otherwise a
    short detail saying why not (the row is then rejected with reason `unsafe_caption`)."""
    m = _TAG_LIKE.search(caption)
    if m:
        return f"tag-like text {m.group(0)[:40]!r} at char {m.start()}"
    return None
