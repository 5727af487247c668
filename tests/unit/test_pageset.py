"""PageSet against a plain set of page numbers (Hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tug.engine.pageset import BLOCK, PAGE, PageSet

_span = st.tuples(st.integers(0, 5 * BLOCK), st.integers(0, 3 * BLOCK))


@settings(max_examples=300, deadline=None)
@given(adds=st.lists(_span, max_size=8), drops=st.lists(_span, max_size=4), probe=_span)
def test_pageset_agrees_with_a_set(adds: list[tuple[int, int]], drops: list[tuple[int, int]], probe: tuple[int, int]) -> None:
    ps, ref = PageSet(), set()
    for first, n in adds:
        ps.add(7, first * PAGE, (first + n) * PAGE)
        ref.update(range(first, first + n))
    for first, n in drops:
        ps.forget(7, first * PAGE, (first + n) * PAGE)
        ref.difference_update(range(first, first + n))
    first, n = probe
    lo, hi = first * PAGE, (first + n) * PAGE
    pages = range(first, first + n)
    assert ps.count(7, lo, hi) == sum(p in ref for p in pages)
    lead_in = next((k for k, p in enumerate(pages) if p not in ref), n)
    lead_out = next((k for k, p in enumerate(pages) if p in ref), n)
    assert ps.leading(7, lo, hi, held=True) == lead_in
    assert ps.leading(7, lo, hi, held=False) == lead_out
    missing = [p for p in pages if p not in ref]
    assert [q for a, b in ps.missing(7, lo, hi) for q in range(a // PAGE, b // PAGE)] == missing
    assert ps.pages(7) == len(ref)
    assert ps.leading(8, lo, hi, held=False) == n  # another process: empty
