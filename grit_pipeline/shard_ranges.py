"""Sets of shard numbers kept as sorted ranges, and their text form `0-9,12` (the `--shards` syntax).

A run of 100,000 shards that committed in order is one range, so what the run directory's summaries
(`grit_pipeline.rundir.ledger`), `run.yaml`'s `planned_shards` and `grit status` hold about it stays a
few bytes, not one number per shard.

    r = ShardRanges.parse("0-9,12")
    r.add(10); 11 in r; len(r)         # 12
    str(r)                             # '0-12'
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Iterator

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class ShardRanges:
    """A set of non-negative ints as sorted, disjoint, non-adjacent inclusive ranges."""

    __slots__ = ("_lo", "_hi", "_len")

    def __init__(self, values: Iterable[int] = ()):
        self._lo: list[int] = []
        self._hi: list[int] = []
        self._len = 0
        run: list[int] = []
        for v in sorted(set(int(x) for x in values)):
            if run and v == run[1] + 1:
                run[1] = v
                continue
            if run:
                self._append(*run)
            run = [v, v]
        if run:
            self._append(*run)

    def _append(self, lo: int, hi: int) -> None:
        self._lo.append(lo)
        self._hi.append(hi)
        self._len += hi - lo + 1

    @classmethod
    def parse(cls, spec: str | int) -> ShardRanges:
        """`"0-9,12"` -> the set {0..9, 12}; ranges are inclusive. ValueError on bad syntax."""
        out = cls()
        text = str(spec).strip()
        if not text:
            return out
        for part in text.split(","):
            m = _RANGE.match(part)
            if not m:
                raise ValueError(f"bad shard selection {part.strip()!r} in {spec!r}; use e.g. 3, 0-9 or 0-4,7")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise ValueError(f"empty shard range {part.strip()!r} in {spec!r}")
            out.add_range(lo, hi)
        return out

    def add(self, value: int) -> None:
        self.add_range(value, value)

    def add_range(self, lo: int, hi: int) -> None:
        """Add lo..hi (inclusive), merging with touching or overlapping ranges."""
        i = bisect.bisect_left(self._hi, lo - 1)  # first range that could touch [lo, hi]
        j = i
        while j < len(self._lo) and self._lo[j] <= hi + 1:
            lo, hi = min(lo, self._lo[j]), max(hi, self._hi[j])
            self._len -= self._hi[j] - self._lo[j] + 1
            j += 1
        self._lo[i:j] = [lo]
        self._hi[i:j] = [hi]
        self._len += hi - lo + 1

    def discard(self, value: int) -> None:
        i = bisect.bisect_right(self._lo, value) - 1
        if i < 0 or self._hi[i] < value:
            return
        lo, hi = self._lo[i], self._hi[i]
        pieces = [(a, b) for a, b in ((lo, value - 1), (value + 1, hi)) if a <= b]
        self._lo[i:i + 1] = [a for a, _ in pieces]
        self._hi[i:i + 1] = [b for _, b in pieces]
        self._len -= 1

    def update(self, other: Iterable[int] | ShardRanges) -> None:
        if isinstance(other, ShardRanges):
            for lo, hi in other.ranges():
                self.add_range(lo, hi)
        else:
            for v in other:
                self.add(v)

    def intersection(self, other: ShardRanges) -> ShardRanges:
        """The shards in both, by walking the two range lists (cost in ranges, not shards)."""
        out = ShardRanges()
        a, b = self.ranges(), other.ranges()
        i = j = 0
        while i < len(a) and j < len(b):
            lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if lo <= hi:
                out._append(lo, hi)
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return out

    def difference(self, other: ShardRanges) -> ShardRanges:
        """The shards of this set not in `other` (cost in ranges, not shards)."""
        out = ShardRanges()
        b = other.ranges()
        j = 0
        for lo, hi in self.ranges():
            while j < len(b) and b[j][1] < lo:
                j += 1
            k = j
            while lo <= hi:
                if k >= len(b) or b[k][0] > hi:
                    out._append(lo, hi)
                    break
                if b[k][0] > lo:
                    out._append(lo, b[k][0] - 1)
                lo = b[k][1] + 1
                k += 1
        return out

    def bounds(self) -> tuple[list[int], list[int]]:
        """(lows, highs) of the ranges: for vectorized membership tests (`numpy.searchsorted`)."""
        return list(self._lo), list(self._hi)

    def max(self) -> int:
        """The largest shard; ValueError when empty."""
        if not self._hi:
            raise ValueError("max() of an empty ShardRanges")
        return self._hi[-1]

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        i = bisect.bisect_right(self._lo, value) - 1
        return i >= 0 and value <= self._hi[i]

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[int]:
        for lo, hi in zip(self._lo, self._hi, strict=True):
            yield from range(lo, hi + 1)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ShardRanges):
            return self._lo == other._lo and self._hi == other._hi
        return NotImplemented

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._lo, self._hi, strict=True))

    def copy(self) -> ShardRanges:
        out = ShardRanges()
        out._lo, out._hi, out._len = list(self._lo), list(self._hi), self._len
        return out

    def __str__(self) -> str:
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in zip(self._lo, self._hi, strict=True))

    def __repr__(self) -> str:
        return f"ShardRanges({str(self)!r})"
