"""Flat numpy views of a list-of-struct column, for stages that check every entry of a batch at once.

`select` (the `candidates` column) and `compose` (the `pairs` column) read their entries this way: all
entries of the batch in one flat array, each with the row it belongs to, and struct fields as float64
numpy columns with nulls filled. A null list has no entries; a null entry inside a list is kept (its
fields read as the fill value), so entry positions always match the lists' offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class ListEntries:
    """The entries of a list column: `lists` (the column as one array), `values` (its entries, flat) and
    `row` (int64 per entry: the index of its list)."""

    lists: pa.ListArray
    values: pa.Array
    row: np.ndarray

    @classmethod
    def of(cls, column: pa.ChunkedArray | pa.Array) -> ListEntries:
        lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        return cls(lists=lists,
                   values=lists.flatten(),  # honours slicing offsets and skips null lists
                   row=pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64))

    def field(self, name: str, null: float = np.nan) -> np.ndarray:
        """Struct field `name` of every entry as float64, nulls (and null entries) read as `null`."""
        arr = pc.fill_null(pc.struct_field(self.values, name).cast(pa.float64()), null)
        return arr.to_numpy(zero_copy_only=False)
