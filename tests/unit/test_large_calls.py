"""Whatever a container holds, no call outgrows the protocol's frame limit:
manifests and held frames travel in parts."""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from tug.engine import rootfs
from tug.engine.rootfs import FILE, LINK, Entry
from tug.engine.runtime.endpoint import FRAMES_PER_CALL_BYTES, chunk_frames
from tug.transports.protocol import MAX_FRAME_DEFAULT


def test_a_manifest_of_any_size_goes_in_parts_that_fit_a_frame() -> None:
    # 300k entries with long names: one call used to be far over the limit.
    entries = [Entry(f"d{i // 1000}/{'n' * 200}{i}", FILE, 0o644, 0, 0, i, i) for i in range(300_000)]
    parts = rootfs.manifest_parts(entries)
    assert len(parts) > 1
    assert [tuple(x) for p in parts for x in p] == [tuple(e.to_wire()) for e in entries]
    assert max(len(msgpack.packb(p)) for p in parts) < MAX_FRAME_DEFAULT // 2


def test_long_symlink_targets_count_against_a_part() -> None:
    entries = [Entry(f"l{i}", LINK, 0o777, 0, 0, 0, 0, "t" * 4000) for i in range(5000)]
    assert max(len(msgpack.packb(p)) for p in rootfs.manifest_parts(entries)) < MAX_FRAME_DEFAULT // 2


def test_an_empty_tree_is_one_empty_part() -> None:
    assert rootfs.manifest_parts([]) == [[]]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=70_000), max_size=400))
def test_held_frames_keep_their_order_and_fit_each_call(sizes: list[int]) -> None:
    frames = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    chunks = chunk_frames(frames, budget=1 << 20)
    assert [f for c in chunks for f in c] == frames
    assert all(sum(map(len, c)) <= 1 << 20 or len(c) == 1 for c in chunks)
    assert chunks[-1] or frames == []


def test_the_default_budget_leaves_room_in_a_frame() -> None:
    assert FRAMES_PER_CALL_BYTES * 2 < MAX_FRAME_DEFAULT
