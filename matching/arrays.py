"""Structure-of-arrays containers and dtypes shared by the engine and its callers.

Every quantity is an integer: prices in micro-dollars per GPU-hour, times in whole seconds since
the epoch, GPU counts.  Blocks (supply) are kept here sorted by `block_id`; the kernels work on a
derived, floor-sorted copy built by `matching.book`.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

INT64_MAX = int(np.iinfo(np.int64).max)

# Input bounds that keep `rate_mph * exposure_s` inside int64 in the kernels (the reference uses
# Python integers and would otherwise disagree on overflow).
MAX_DURATION_S = 10**9  # ~31 years
MAX_RATE_MPH = 10**9  # a million reclaims per hour
MAX_GPUS = 1 << 20


class Tier(IntEnum):
    """The two markets of one GPU model (one priority walk clears both, docs/matching.md)."""

    FIRM = 0
    SPOT = 1


# (name, dtype) of each block column, in the order of `ModelBook.upsert_blocks`' arguments.
BLOCK_FIELDS: tuple[tuple[str, type], ...] = (
    ("block_id", np.int64),
    ("host_id", np.int64),
    ("fabric_id", np.int64),
    ("host_gpus", np.int32),
    ("gpus", np.int32),
    ("free", np.int32),
    ("floor", np.int64),
    ("available_until", np.int64),
    ("firm_until", np.int64),
    ("notice_s", np.int64),
    ("rate_mph", np.int64),
    ("cut_at", np.int64),
)

# (name, dtype) of each bid column, in the order of `ModelBook.add_bids`' arguments.
BID_FIELDS: tuple[tuple[str, type], ...] = (
    ("bid_id", np.int64),
    ("seq", np.int64),
    ("gpus", np.int32),
    ("duration_s", np.int64),
    ("limit", np.int64),
    ("hazard_budget", np.int64),
    ("min_notice_s", np.int64),
)


def as_columns(fields: tuple[tuple[str, type], ...], values: tuple) -> dict[str, np.ndarray]:
    """Convert the positional arguments of an API call to named, contiguous, equal-length columns."""
    cols = {
        name: np.ascontiguousarray(np.asarray(value).astype(dtype, copy=False).reshape(-1))
        for (name, dtype), value in zip(fields, values, strict=True)
    }
    lengths = {len(c) for c in cols.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns have different lengths: { {k: len(v) for k, v in cols.items()} }")
    return cols


def _check(ok: np.ndarray, message: str) -> None:
    if not bool(np.all(ok)):
        raise ValueError(message)


def validate_blocks(c: dict[str, np.ndarray]) -> None:
    _check(c["gpus"] >= 1, "block gpus must be >= 1")
    _check(c["gpus"] <= c["host_gpus"], "block gpus must be <= host_gpus")
    _check(c["host_gpus"] <= MAX_GPUS, "host_gpus too large")
    _check((c["free"] >= 0) & (c["free"] <= c["gpus"]), "block free must be in [0, gpus]")
    _check(c["floor"] >= 0, "block floor must be >= 0")
    _check((c["rate_mph"] >= 0) & (c["rate_mph"] <= MAX_RATE_MPH), "rate_mph out of range")
    _check(c["notice_s"] >= 0, "notice_s must be >= 0")


def validate_bids(c: dict[str, np.ndarray]) -> None:
    _check((c["gpus"] >= 1) & (c["gpus"] <= MAX_GPUS), "bid gpus must be in [1, 2**20]")
    _check((c["duration_s"] >= 1) & (c["duration_s"] <= MAX_DURATION_S), "duration_s out of range")
    _check(c["limit"] >= 1, "bid limit must be >= 1")
    _check(c["hazard_budget"] >= 0, "hazard_budget must be >= 0")
    _check(c["min_notice_s"] >= 0, "min_notice_s must be >= 0")
    if len(np.unique(c["bid_id"])) != len(c["bid_id"]):
        raise ValueError("bid_id must be unique within a batch")


class BlockTable:
    """All live blocks of one GPU model, as columns sorted by `block_id`.

    `order_dirty` says the floor-sorted index must be re-sorted (a block appeared, vanished, or
    changed floor, fabric or size); `values_dirty` says other columns changed; `free_rows` lists
    the rows (in this table) whose only change is `free`, which the index patches in place.
    Re-sending a block unchanged marks nothing.
    """

    _ORDER = ("floor", "fabric_id", "gpus", "host_gpus")

    def __init__(self) -> None:
        self.cols: dict[str, np.ndarray] = {
            name: np.empty(0, dtype=dtype) for name, dtype in BLOCK_FIELDS
        }
        self.order_dirty = True
        self.values_dirty = True
        self.free_rows: list[np.ndarray] = []

    def clear_dirty(self) -> None:
        self.order_dirty = self.values_dirty = False
        self.free_rows = []

    def __len__(self) -> int:
        return len(self.cols["block_id"])

    def upsert(self, new: dict[str, np.ndarray]) -> None:
        validate_blocks(new)
        ids = new["block_id"]
        # Within one batch the last row of a block_id wins.
        _, last = np.unique(ids[::-1], return_index=True)
        keep = np.sort(len(ids) - 1 - last)
        if len(keep) != len(ids):
            new = {k: v[keep] for k, v in new.items()}
            ids = new["block_id"]
        cur = self.cols["block_id"]
        pos = np.searchsorted(cur, ids)
        found = pos < len(cur)
        found[found] = cur[pos[found]] == ids[found]
        if found.any():
            at = pos[found]
            sel = np.flatnonzero(found)
            diff = {name: self.cols[name][at] != new[name][sel] for name, _ in BLOCK_FIELDS}
            if any(diff[name].any() for name in self._ORDER):
                self.order_dirty = True
            if any(diff[name].any() for name, _ in BLOCK_FIELDS
                   if name not in self._ORDER and name != "free"):
                self.values_dirty = True
            changed = np.zeros(len(at), bool)
            for d in diff.values():
                changed |= d
            if changed.any():
                at, sel = at[changed], sel[changed]
                for name, _ in BLOCK_FIELDS:
                    self.cols[name][at] = new[name][sel]
                if diff["free"].any():
                    self.free_rows.append(at[diff["free"][changed]])
        if not found.all():
            fresh = ~found
            merged = {k: np.concatenate([self.cols[k], new[k][fresh]]) for k in self.cols}
            order = np.argsort(merged["block_id"], kind="stable")
            self.cols = {k: np.ascontiguousarray(v[order]) for k, v in merged.items()}
            self.order_dirty = True

    def remove(self, block_ids: np.ndarray) -> None:
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        keep = ~np.isin(self.cols["block_id"], ids)
        if not keep.all():
            self.cols = {k: v[keep] for k, v in self.cols.items()}
            self.order_dirty = True
