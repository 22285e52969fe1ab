"""A quote's eligible GPUs (ModelBook.eligible_free) count exactly the free GPUs of the blocks that the
clearing rule's eligibility admits, floor aside: the engine's count against the plain reference."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from matching import INT64_MAX, Tier
from matching.reference import _eligible
from matching.testing import book_from_records
from tests.unit.test_matching import BUDGETS, H, NOW, PROPERTY, blocks_st


@PROPERTY
@given(blocks_st(max_blocks=16), st.sampled_from(list(Tier)), st.sampled_from([1, 2, 6, 24, 60]),
       st.sampled_from(BUDGETS), st.sampled_from([0, 60, 120, 300, 301]))
def test_eligible_free_is_the_reference_eligibility_without_floor(blocks, tier, hours, budget, min_notice_s):
    terms = {"duration_s": hours * H, "hazard_budget": budget, "min_notice_s": min_notice_s,
             "limit": INT64_MAX}  # any floor passes: eligibility here is about the terms, not the price
    expected = sum(blk["free"] for blk in blocks if _eligible(tier, terms, blk, NOW))

    book = book_from_records(blocks, [], [])
    counted = book.eligible_free(tier, NOW, hours * H, min_notice_s, budget)

    assert counted == expected
    # Counting leaves the book as it was: the tick after it clears the same supply.
    assert book.blocks()["free"].tolist() == [blk["free"] for blk in sorted(blocks, key=lambda b: b["block_id"])]
