"""Safe display of untrusted text: captions, keys, URLs and reject details come from the web.

Everything the project shows a person -- `grit inspect` and `grit stats` in the terminal, log lines,
`grit validate` messages, the HTML report -- passes untrusted text through `display_text` first. It replaces
the characters that can act on a terminal or reorder what a reader sees with a visible escape, and keeps
every other character (emoji, combining marks, right-to-left scripts) as it is:

- C0 controls U+0000-U+001F (ESC starts terminal escape sequences; NUL, BEL, BS, CR, LF, TAB included),
  DEL U+007F and the C1 controls U+0080-U+009F (U+009B is an 8-bit CSI): `\\x1b`, `\\x7f`, `\\x9b`;
- bidirectional formatting characters, which can make text display in another order than it is stored
  ("Trojan Source"): embeddings and overrides U+202A-U+202E, isolates U+2066-U+2069, the marks U+200E,
  U+200F and U+061C: `\\u202e`;
- the line and paragraph separators U+2028/U+2029, which some viewers break lines at.

A backslash already in the text is left alone: the output is for reading, not for parsing back.
"""

from __future__ import annotations

from functools import lru_cache

UNSAFE_CODEPOINTS: tuple[int, ...] = (
    *range(0x00, 0x20), 0x7F, *range(0x80, 0xA0),  # C0, DEL, C1
    0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A),  # bidi marks, embeddings, isolates
    0x2028, 0x2029,  # line / paragraph separator
)


def _escape(cp: int) -> str:
    return f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}"


@lru_cache(maxsize=8)
def _table(keep: str) -> dict[int, str]:
    return {cp: _escape(cp) for cp in UNSAFE_CODEPOINTS if chr(cp) not in keep}


def display_text(value: object, keep: str = "") -> str:
    """`value` as text safe to show: unsafe characters (module docstring) written as `\\xNN`/`\\uNNNN`.
    Characters in `keep` pass unchanged (e.g. `keep="\\n"` for multi-line text such as a traceback)."""
    text = value if isinstance(value, str) else str(value)
    return text.translate(_table(keep))
