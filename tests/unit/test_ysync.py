"""The y-websocket frames, byte for byte, and safe pycrdt use, without sockets."""

from __future__ import annotations

import contextlib

import pycrdt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rooms import crdt
from rooms.errors import MessageTooBig
from rooms.ysync import (
    Auth,
    AwarenessEntry,
    AwarenessUpdate,
    ProtocolViolation,
    QueryAwareness,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    create_awareness,
    create_permission_denied,
    create_query_awareness,
    create_sync_step1,
    create_sync_step2,
    create_update,
    parse_frame,
    write_var_uint,
)


def test_var_uint_matches_lib0() -> None:
    """varUint encoding as lib0 writes it (7 bits a byte, little end first)."""
    assert write_var_uint(0) == b"\x00"
    assert write_var_uint(127) == b"\x7f"
    assert write_var_uint(128) == b"\x80\x01"
    assert write_var_uint(300) == b"\xac\x02"
    assert write_var_uint(2**53 - 1) == b"\xff" * 7 + b"\x0f"
    with pytest.raises(ValueError, match="out of range"):
        write_var_uint(2**53)


def test_frames_are_byte_exact_with_pycrdt() -> None:
    """Our encoders produce the same bytes as pycrdt's for sync and update messages."""
    doc = pycrdt.Doc()
    doc.get("t", type=pycrdt.Text).insert(0, "hello")
    update = doc.get_update()
    assert create_update(update) == pycrdt.create_update_message(update)
    assert create_sync_step1(doc.get_state()) == pycrdt.create_sync_message(doc)
    assert (
        create_sync_step2(update) == b"\x00\x01" + write_var_uint(len(update)) + update
    )
    assert create_query_awareness() == b"\x03"
    assert create_permission_denied("read-only") == b"\x02\x00\x09read-only"


def test_parse_each_message_type() -> None:
    """Every message type parses to its typed form, and round-trips."""
    assert parse_frame(b"\x00\x00\x01\x00", max_frame_bytes=100) == SyncStep1(b"\x00")
    assert parse_frame(b"\x00\x01\x02\x00\x00", max_frame_bytes=100) == SyncStep2(
        b"\x00\x00"
    )
    assert parse_frame(b"\x00\x02\x02\x00\x00", max_frame_bytes=100) == SyncUpdate(
        b"\x00\x00"
    )
    assert parse_frame(b"\x03", max_frame_bytes=100) == QueryAwareness()
    assert parse_frame(b"\x02\x00\x02no", max_frame_bytes=100) == Auth("no")
    entries = (
        AwarenessEntry(7, 3, '{"user":{"name":"Ana"}}'),
        AwarenessEntry(9, 4, "null"),
    )
    assert parse_frame(
        create_awareness(entries), max_frame_bytes=1000
    ) == AwarenessUpdate(entries)


def test_awareness_from_pycrdt_parses() -> None:
    """An awareness message made by pycrdt parses to its client, clock and state."""
    doc = pycrdt.Doc()
    awareness = pycrdt.Awareness(doc)
    awareness.set_local_state({"cursor": 3})
    frame = pycrdt.create_awareness_message(
        awareness.encode_awareness_update([doc.client_id])
    )
    parsed = parse_frame(frame, max_frame_bytes=1000)
    assert isinstance(parsed, AwarenessUpdate)
    assert parsed.entries[0].client_id == doc.client_id
    assert parsed.entries[0].state == '{"cursor":3}'


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x09",
        b"\x00\x07\x00",
        b"\x00\x02\x05ab",
        b"\x00\x02\x00x",
        b"\x00\x02" + b"\xff" * 9,
        b"\x02\x01\x00",
        b"\x01\x04\x01\x01\x01\x01[",
        b"\x01\x05\x01\x01\x01\x02[]",  # awareness state must be an object or null
        b"\x01\x03\x09\x01\x01",  # claims 9 entries
    ],
)
def test_malformed_frames_raise_protocol_violation(frame: bytes) -> None:
    """Malformed frames raise ProtocolViolation (close 4400)."""
    with pytest.raises(ProtocolViolation):
        parse_frame(frame, max_frame_bytes=1000)


def test_oversized_frame_raises_message_too_big() -> None:
    """A frame over the limit raises MessageTooBig (close 1009) before any parsing."""
    with pytest.raises(MessageTooBig):
        parse_frame(b"\x00\x02" + b"\x00" * 100, max_frame_bytes=50)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_parse_or_raise_the_documented_error(frame: bytes) -> None:
    """Fuzz: arbitrary bytes give a frame or ProtocolViolation, never anything else."""
    with contextlib.suppress(ProtocolViolation):
        parse_frame(frame, max_frame_bytes=1 << 20)


def test_linear_decoder_on_a_large_frame() -> None:
    """A 2 MB update frame parses quickly (pycrdt's own reader is quadratic)."""
    import time

    payload = b"\x01" * 2_000_000
    frame = create_update(payload)
    started = time.perf_counter()
    parsed = parse_frame(frame, max_frame_bytes=4_000_000)
    assert isinstance(parsed, SyncUpdate) and len(parsed.update) == 2_000_000
    assert time.perf_counter() - started < 0.5


class PanicException(BaseException):
    """Stands in for pyo3_runtime.PanicException, which derives from BaseException."""


class _Exploding:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def apply_update(self, update: bytes) -> None:
        raise self.exc


def test_panics_are_rejections_but_interrupts_pass_through() -> None:
    """A Rust panic (a BaseException) becomes UpdateRejected; Ctrl-C is not swallowed."""
    with pytest.raises(crdt.UpdateRejected, match="PanicException"):
        crdt.apply(_Exploding(PanicException("boom")), b"")  # type: ignore[arg-type]
    with pytest.raises(crdt.UpdateRejected, match="ValueError"):
        crdt.apply(_Exploding(ValueError("bad")), b"")  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        crdt.apply(_Exploding(KeyboardInterrupt()), b"")  # type: ignore[arg-type]


def test_restore_makes_a_document_read_like_its_version() -> None:
    """restore_update, applied to the live document, gives the version's content back."""
    doc = pycrdt.Doc()
    activities = doc.get("activities", type=pycrdt.Array)
    activities.append(pycrdt.Map({"id": "a", "title": "first"}))
    doc.get("notes", type=pycrdt.Text).insert(0, "kept")
    version = doc.get_update()
    with doc.transaction():
        activities[0]["title"] = "changed"
        activities.append(pycrdt.Map({"id": "b"}))
        doc.get("notes", type=pycrdt.Text).insert(4, " and more")
    live = crdt.build([doc.get_update()])
    crdt.apply(live, crdt.restore_update(live, version))
    assert crdt.content(live)["activities"] == [{"id": "a", "title": "first"}]
    assert crdt.content(live)["notes"] == "kept"


def test_merged_updates_apply_like_each_one() -> None:
    """A merge of interleaved updates from several clients (some depending on
    others) gives the same document as applying them one by one, and a merge of
    one update is that update."""
    writers = [pycrdt.Doc() for _ in range(3)]
    updates: list[bytes] = []
    for n in range(30):
        doc = writers[n % 3]
        for update in updates:  # each writer has seen everything so far
            doc.apply_update(update)
        before = doc.get_state()
        doc.get("items", type=pycrdt.Array).append(f"item-{n}")
        updates.append(doc.get_update(before))
    one_by_one = crdt.build(updates)
    merged = crdt.merge_updates(updates)
    assert merged is not None
    assert crdt.merge_updates(updates[:1]) == updates[0]
    together = crdt.build([merged])
    assert pycrdt.get_update(together.get_update(), one_by_one.get_state()) == b"\0\0"
    assert pycrdt.get_update(one_by_one.get_update(), together.get_state()) == b"\0\0"
    items = together.get("items", type=pycrdt.Array)
    assert sorted(items.to_py()) == sorted(f"item-{n}" for n in range(30))
