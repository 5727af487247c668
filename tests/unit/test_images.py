"""Tests for the CRIU pagemap reader/writer: exact bytes, old layouts, garbage, layout maths."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tug.engine.criu import images, protobuf
from tug.engine.criu.images import (
    PAGE_SIZE,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    iter_pages,
    page_layout,
    pagemap_file_name,
    pages_file_name,
    pages_file_size,
    process_pagemap_pid,
    read_pagemap,
    shmem_pagemap_id,
    write_pagemap,
)
from tug.engine.errors import ImageFormatError, MigrationError

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAGICS = struct.pack("<II", 0x54564319, 0x56084025)
U64 = 1 << 64

# The first bytes of a pagemap-1.img CRIU 4.2.1 wrote on this platform (head, two entries).
CRIU_SAMPLE = bytes.fromhex(
    "19435654" "25400856"  # IMG_COMMON_MAGIC, PAGEMAP_MAGIC (little-endian u32s)
    "02000000" "0801"  # PagemapHead{pages_id=1}
    "0e000000" "0880a0dd93bfae15" "1000" "2004" "2801"  # vaddr=0x5573f2775000, compat=0, flags=4, nr=1
    "0e000000" "0880e0dd93bfae15" "1000" "2004" "2802"  # vaddr=0x5573f2777000, flags=4, nr=2
)


def varint(value: int) -> bytes:
    """Independent reference encoder for building test records by hand."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def frame(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


def image(head: bytes, *entries: bytes) -> bytes:
    return MAGICS + frame(head) + b"".join(frame(e) for e in entries)


# --- strategies ---------------------------------------------------------------


@st.composite
def pagemaps(draw: st.DrawFn) -> Pagemap:
    """Ascending, non-overlapping entries anywhere in the 64-bit space, u32 flags."""
    entries = []
    page = draw(st.integers(0, (U64 // PAGE_SIZE) - 1))
    for _ in range(draw(st.integers(0, 12))):
        room = U64 // PAGE_SIZE - page
        if room <= 0:
            break
        nr = draw(st.integers(1, min(room, 1 << 40)))
        flags = draw(st.one_of(st.sampled_from([PE_PRESENT, PE_PRESENT | PE_LAZY, PE_PARENT, PE_LAZY]), st.integers(0, (1 << 32) - 1)))
        entries.append(PagemapEntry(vaddr=page * PAGE_SIZE, nr_pages=nr, flags=flags))
        page += nr + draw(st.integers(0, 1 << 20))
    return Pagemap(pages_id=draw(st.integers(0, (1 << 32) - 1)), entries=tuple(entries))


# --- exact bytes against CRIU ---------------------------------------------------


def test_reads_and_rewrites_criu_bytes() -> None:
    pm = read_pagemap(CRIU_SAMPLE)
    assert pm == Pagemap(1, (PagemapEntry(0x5573F2775000, 1, PE_PRESENT), PagemapEntry(0x5573F2777000, 2, PE_PRESENT)))
    assert write_pagemap(pm) == CRIU_SAMPLE
    assert pages_file_size(pm) == 3 * PAGE_SIZE
    assert pages_file_name(pm.pages_id) == "pages-1.img"


def test_empty_pagemap_is_head_only() -> None:
    assert write_pagemap(Pagemap(7, ())) == MAGICS + b"\x02\x00\x00\x00\x08\x07"
    assert read_pagemap(MAGICS + b"\x02\x00\x00\x00\x08\x07") == Pagemap(7, ())


def test_entry_bytes_follow_protobuf_c() -> None:
    """Field order 1,2,4,5; compat_nr_pages=0 present (required); flags=0 still written."""
    data = write_pagemap(Pagemap(3, (PagemapEntry(0, 1, 0),)))
    assert data == MAGICS + frame(b"\x08\x03") + frame(b"\x08\x00\x10\x00\x20\x00\x28\x01")


@FAST
@given(pagemaps())
def test_round_trip(pm: Pagemap) -> None:
    data = write_pagemap(pm)
    assert read_pagemap(data) == pm
    assert write_pagemap(read_pagemap(data)) == data


# --- varint codec edges ---------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32 - 1, 2**32, 2**63, 2**64 - 1])
def test_varint_codec(value: int) -> None:
    enc = protobuf.encode_varint(value)
    assert enc == varint(value)
    assert protobuf.decode_varint(enc + b"\xff", 0, len(enc)) == (value, len(enc))


def test_varint_lengths() -> None:
    assert protobuf.encode_varint(0) == b"\x00"
    assert protobuf.encode_varint(2**32 - 1) == b"\xff\xff\xff\xff\x0f"
    assert protobuf.encode_varint(2**64 - 1) == b"\xff" * 9 + b"\x01"


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_varint_encode_out_of_range(bad: int) -> None:
    with pytest.raises(ImageFormatError):
        protobuf.encode_varint(bad)


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # nothing
        b"\x80",  # continuation with no next byte
        b"\xff" * 9 + b"\x02",  # 10 bytes but 2**64 or more
        b"\xff" * 10 + b"\x01",  # 11 bytes
        b"\x80" * 10 + b"\x00",  # 11 bytes even if the value is small
    ],
)
def test_varint_decode_rejects(raw: bytes) -> None:
    with pytest.raises(ImageFormatError):
        protobuf.decode_varint(raw, 0, len(raw))


@pytest.mark.parametrize(
    "vaddr, nr_pages",
    [(0, 1), (2**32 - PAGE_SIZE, 1), (2**32, 2**20), (2**64 - PAGE_SIZE, 1), (0, 2**52), (2**63, 2**51)],
)
def test_entry_extremes_round_trip(vaddr: int, nr_pages: int) -> None:
    pm = Pagemap(2**32 - 1, (PagemapEntry(vaddr, nr_pages, 2**32 - 1),))
    assert read_pagemap(write_pagemap(pm)) == pm


def test_vaddr_at_top_of_address_space_is_ten_byte_varint() -> None:
    data = write_pagemap(Pagemap(1, (PagemapEntry(2**64 - PAGE_SIZE, 1, PE_PRESENT),)))
    entry = data[8 + 4 + 2 + 4 :]
    assert entry[:11] == b"\x08" + varint(2**64 - PAGE_SIZE) and len(varint(2**64 - PAGE_SIZE)) == 10


# --- tolerance: unknown fields and old layouts --------------------------------------


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    extra = (
        field(6, 2**63)  # varint
        + varint(7 << 3 | 1) + b"\x01" * 8  # fixed64
        + varint(8 << 3 | 2) + varint(5) + b"hello"  # length-delimited
        + varint(9 << 3 | 5) + b"\x02" * 4  # fixed32
        + varint(1000 << 3 | 2) + varint(0)  # empty bytes, large field number
    )
    head = extra + field(1, 42) + extra
    entry = field(1, 0x1000) + extra + field(2, 0) + field(4, PE_PRESENT) + extra + field(5, 3)
    pm = read_pagemap(image(head, entry))
    assert pm == Pagemap(42, (PagemapEntry(0x1000, 3, PE_PRESENT),))
    # Not kept: the writer emits only CRIU's fields.
    assert write_pagemap(pm) == image(field(1, 42), field(1, 0x1000) + field(2, 0) + field(4, PE_PRESENT) + field(5, 3))


def test_field_order_and_repeats_do_not_matter_last_wins() -> None:
    entry = field(5, 9) + field(4, PE_LAZY) + field(2, 0) + field(1, 0x2000) + field(5, 2) + field(4, PE_PRESENT)
    assert read_pagemap(image(field(1, 1), entry)).entries == (PagemapEntry(0x2000, 2, PE_PRESENT),)


def test_old_layout_without_flags_means_present() -> None:
    pm = read_pagemap(image(field(1, 1), field(1, 0x3000) + field(2, 4)))
    assert pm.entries == (PagemapEntry(0x3000, 4, PE_PRESENT),)


def test_old_layout_in_parent_means_parent() -> None:
    pm = read_pagemap(image(field(1, 1), field(1, 0x3000) + field(2, 4) + field(3, 1)))
    assert pm.entries == (PagemapEntry(0x3000, 4, PE_PARENT),)
    with_flags = read_pagemap(image(field(1, 1), field(1, 0x3000) + field(2, 4) + field(3, 1) + field(4, PE_LAZY)))
    assert with_flags.entries == (PagemapEntry(0x3000, 4, PE_LAZY | PE_PARENT),)
    not_parent = read_pagemap(image(field(1, 1), field(1, 0x3000) + field(2, 4) + field(3, 0)))
    assert not_parent.entries == (PagemapEntry(0x3000, 4, PE_PRESENT),)


def test_nr_pages_overrides_compat_nr_pages() -> None:
    pm = read_pagemap(image(field(1, 1), field(1, 0) + field(2, 7) + field(4, PE_PRESENT) + field(5, 2)))
    assert pm.entries[0].nr_pages == 2


# --- malformed input -----------------------------------------------------------------

GOOD_ENTRY = field(1, 0x1000) + field(2, 0) + field(4, PE_PRESENT) + field(5, 1)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        MAGICS[:7],
        MAGICS,  # no head
        struct.pack("<II", 0x55105940, 0x56084025) + frame(field(1, 1)),  # service magic
        struct.pack("<II", 0x54564319, 0x50273030) + frame(field(1, 1)),  # a pstree image
        struct.pack("<I", 0x56084025) + frame(field(1, 1)),  # pre-1.1 image without common magic
        MAGICS + b"\x02\x00\x00",  # truncated length
        MAGICS + b"\x05\x00\x00\x00\x08\x01",  # record longer than the file
        image(field(1, 1)) + b"\x01",  # trailing partial length
        image(field(1, 1)) + frame(GOOD_ENTRY)[:-1],  # torn last entry
        image(b""),  # head without pages_id
        image(field(1, 2**32)),  # pages_id beyond u32
        image(varint(1 << 3 | 2) + varint(1) + b"\x01"),  # pages_id as bytes
        image(field(1, 1), field(2, 0) + field(4, PE_PRESENT) + field(5, 1)),  # no vaddr
        image(field(1, 1), field(1, 0x1000) + field(4, PE_PRESENT) + field(5, 1)),  # no compat_nr_pages
        image(field(1, 1), field(1, 0x1001) + field(2, 0) + field(5, 1)),  # unaligned vaddr
        image(field(1, 1), field(1, 0x1000) + field(2, 0) + field(5, 0)),  # zero pages
        image(field(1, 1), field(1, 2**64 - PAGE_SIZE) + field(2, 0) + field(5, 2)),  # wraps
        image(field(1, 1), field(1, 0x1000) + field(2, 0) + field(4, 2**32)),  # flags beyond u32
        image(field(1, 1), field(1, 0x1000) + field(2, 2**32)),  # compat beyond u32
        image(field(1, 1), varint(1 << 3 | 1) + b"\x00" * 8 + field(2, 0)),  # vaddr as fixed64
        image(field(1, 1), GOOD_ENTRY + varint(6 << 3 | 3)),  # start-group
        image(field(1, 1), GOOD_ENTRY + varint(6 << 3 | 4)),  # end-group
        image(field(1, 1), GOOD_ENTRY + varint(6 << 3 | 6)),  # reserved wire type
        image(field(1, 1), GOOD_ENTRY + varint(0 << 3 | 0) + b"\x00"),  # field number 0
        image(field(1, 1), GOOD_ENTRY + varint(6 << 3 | 2) + varint(10) + b"abc"),  # bytes past record
        image(field(1, 1), GOOD_ENTRY + varint(6 << 3 | 1) + b"\x00" * 7),  # fixed64 past record
        image(field(1, 1), GOOD_ENTRY + varint(6 << 3 | 5) + b"\x00" * 3),  # fixed32 past record
        image(field(1, 1), GOOD_ENTRY + b"\x30"),  # key without value
        image(field(1, 1), GOOD_ENTRY, GOOD_ENTRY),  # same page twice
        image(field(1, 1), field(1, 0x5000) + field(2, 0) + field(5, 1), GOOD_ENTRY),  # descending
        image(field(1, 1), field(1, 0x1000) + field(2, 0) + field(5, 2), field(1, 0x2000) + field(2, 0) + field(5, 1)),  # overlap
    ],
)
def test_malformed_raises_image_format_error(data: bytes) -> None:
    with pytest.raises(ImageFormatError):
        read_pagemap(data)


def test_adjacent_entries_are_fine() -> None:
    e1 = field(1, 0x1000) + field(2, 0) + field(4, PE_PRESENT) + field(5, 2)
    e2 = field(1, 0x3000) + field(2, 0) + field(4, PE_PRESENT | PE_LAZY) + field(5, 1)
    assert len(read_pagemap(image(field(1, 1), e1, e2)).entries) == 2


def check_only_image_errors(data: bytes) -> None:
    try:
        pm = read_pagemap(data)
    except ImageFormatError:
        return
    # Whatever parses must write back to something that parses to the same thing.
    assert read_pagemap(write_pagemap(pm)) == pm


@FAST
@given(st.binary(max_size=256))
def test_garbage_raises_only_image_format_error(data: bytes) -> None:
    check_only_image_errors(data)


@FAST
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_garbage_records_behind_valid_magic(records: list[bytes]) -> None:
    check_only_image_errors(MAGICS + b"".join(frame(r) for r in records))


@FAST
@given(pagemaps(), st.data())
def test_mutated_images_raise_only_image_format_error(pm: Pagemap, data: st.DataObject) -> None:
    raw = bytearray(write_pagemap(pm))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(raw)))
        if op == "flip" and pos < len(raw):
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[pos : pos + data.draw(st.integers(1, 8))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    check_only_image_errors(bytes(raw))


# --- construction checks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "vaddr, nr_pages, flags",
    [(-PAGE_SIZE, 1, 0), (1, 1, 0), (2**64, 1, 0), (0, 0, 0), (0, -1, 0), (0, 2**64, 0), (2**64 - PAGE_SIZE, 2, 0), (0, 1, -1), (0, 1, 2**32)],
)
def test_entry_validation(vaddr: int, nr_pages: int, flags: int) -> None:
    with pytest.raises(ImageFormatError):
        PagemapEntry(vaddr, nr_pages, flags)


@pytest.mark.parametrize("pages_id", [-1, 2**32])
def test_pagemap_pages_id_range(pages_id: int) -> None:
    with pytest.raises(ImageFormatError):
        Pagemap(pages_id, ())
    with pytest.raises(ImageFormatError):
        pages_file_name(pages_id)


def test_error_is_a_migration_error() -> None:
    assert issubclass(ImageFormatError, MigrationError)
    assert ImageFormatError.kind == "image"
    assert images.ImageFormatError is ImageFormatError


# --- layout -------------------------------------------------------------------------


def test_page_layout_offsets_follow_present_entries() -> None:
    pm = Pagemap(
        5,
        (
            PagemapEntry(0x1000, 2, PE_PRESENT),
            PagemapEntry(0x10000, 3, PE_PRESENT | PE_LAZY),
            PagemapEntry(0x20000, 1, PE_PRESENT),
        ),
    )
    assert page_layout(pm) == [(0x1000, 2, 0), (0x10000, 3, 2 * PAGE_SIZE), (0x20000, 1, 5 * PAGE_SIZE)]
    assert pages_file_size(pm) == 6 * PAGE_SIZE
    assert list(iter_pages(pm)) == [
        (0x1000, 0),
        (0x2000, PAGE_SIZE),
        (0x10000, 2 * PAGE_SIZE),
        (0x11000, 3 * PAGE_SIZE),
        (0x12000, 4 * PAGE_SIZE),
        (0x20000, 5 * PAGE_SIZE),
    ]


@pytest.mark.parametrize("flags", [PE_PARENT, PE_LAZY, PE_PARENT | PE_LAZY, 0])
def test_page_layout_rejects_data_kept_elsewhere(flags: int) -> None:
    pm = Pagemap(1, (PagemapEntry(0x1000, 1, PE_PRESENT), PagemapEntry(0x4000, 2, flags), PagemapEntry(0x8000, 1, PE_PRESENT)))
    with pytest.raises(ImageFormatError, match="no data in pages-1.img"):
        page_layout(pm)
    assert page_layout(pm, skip_absent=True) == [(0x1000, 1, 0), (0x8000, 1, PAGE_SIZE)]
    assert pages_file_size(pm) == 2 * PAGE_SIZE
    assert [v for v, _ in iter_pages(pm, skip_absent=True)] == [0x1000, 0x8000]


@FAST
@given(pagemaps())
def test_layout_tiles_the_pages_file(pm: Pagemap) -> None:
    runs = page_layout(pm, skip_absent=True)
    offset = 0
    for _, nr, off in runs:
        assert off == offset
        offset += nr * PAGE_SIZE
    assert offset == pages_file_size(pm)
    assert [v for v, _, _ in runs] == [e.vaddr for e in pm.entries if e.flags & PE_PRESENT]


# --- names -------------------------------------------------------------------------


def test_names() -> None:
    assert pages_file_name(0) == "pages-0.img"
    assert pages_file_name(2**32 - 1) == "pages-4294967295.img"
    assert pagemap_file_name(12) == "pagemap-12.img"
    with pytest.raises(ImageFormatError):
        pagemap_file_name(0)


@pytest.mark.parametrize(
    "name, pid",
    [
        ("pagemap-1.img", 1),
        ("pagemap-12.img", 12),
        ("pagemap-4194304.img", 4194304),
        ("pagemap-shmem-12.img", None),
        ("pagemap-012.img", None),
        ("pagemap-0.img", None),
        ("pagemap--1.img", None),
        ("pagemap-+1.img", None),
        ("pagemap-1.img.tmp", None),
        ("pagemap-1.im", None),
        ("pages-1.img", None),
        ("dir/pagemap-1.img", None),
        ("pagemap-١.img", None),  # non-ASCII digit
        ("", None),
    ],
)
def test_process_pagemap_pid(name: str, pid: int | None) -> None:
    assert process_pagemap_pid(name) == pid
    if pid is not None:
        assert pagemap_file_name(pid) == name


def test_shmem_pagemap_id() -> None:
    assert shmem_pagemap_id("pagemap-shmem-4242.img") == 4242
    assert shmem_pagemap_id("pagemap-4242.img") is None
    assert shmem_pagemap_id("pagemap-shmem-.img") is None
