"""Feed the same plain records (lists of dicts, as `reference_tick` takes them) to a ModelBook.

Used by the tests and the benchmark to run the engine and the reference side by side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from matching.arrays import BID_FIELDS, BLOCK_FIELDS, Tier
from matching.book import ModelBook


def columns(records: Sequence[Mapping], fields) -> list[np.ndarray]:
    return [np.array([r[name] for r in records], dtype=dtype) for name, dtype in fields]


def upsert_records(book: ModelBook, blocks: Sequence[Mapping]) -> None:
    book.upsert_blocks(*columns(blocks, BLOCK_FIELDS))


def add_records(book: ModelBook, tier: Tier, bids: Sequence[Mapping]) -> None:
    book.add_bids(tier, *columns(bids, BID_FIELDS))


def book_from_records(
    blocks: Sequence[Mapping],
    firm_bids: Sequence[Mapping],
    spot_bids: Sequence[Mapping],
    incumbents: Sequence[Mapping] = (),
) -> ModelBook:
    book = ModelBook()
    upsert_records(book, blocks)
    add_records(book, Tier.FIRM, firm_bids)
    add_records(book, Tier.SPOT, spot_bids)
    book.set_incumbents(
        np.array([i["lease_id"] for i in incumbents], np.int64),
        np.array([i["limit"] for i in incumbents], np.int64),
    )
    return book


def records_from_columns(cols: Mapping[str, np.ndarray]) -> list[dict]:
    """Columns (e.g. `ModelBook.blocks()`) back to a list of dicts of Python ints."""
    names = list(cols)
    return [dict(zip(names, row, strict=True)) for row in zip(*(cols[k].tolist() for k in names), strict=True)]
