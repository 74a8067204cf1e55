"""``Step2Cache``: what a fresh client gets is always the document as it is now."""

from __future__ import annotations

import pycrdt
import pytest

from rooms import step2_cache
from rooms.step2_cache import Step2Cache
from rooms.ysync import SyncStep2, SyncUpdate, parse_frame


def joiner(frames: list[bytes]) -> pycrdt.Doc:
    """A fresh client applying the frames in order; the step 2 comes last (that
    is when clients count themselves synced)."""
    doc = pycrdt.Doc()
    for n, frame in enumerate(frames, 1):
        parsed = parse_frame(frame, max_frame_bytes=1 << 30)
        assert isinstance(parsed, SyncStep2 if n == len(frames) else SyncUpdate)
        doc.apply_update(parsed.update)
    return doc


class Source:
    """A live document and its cache, changed the way ``LiveDocument`` does."""

    def __init__(self) -> None:
        self.doc = pycrdt.Doc()
        self.text = self.doc.get("text", type=pycrdt.Text)
        self.cache = Step2Cache()
        self.encodings = 0

    def encode(self) -> bytes:
        self.encodings += 1
        return self.doc.get_update()

    def change(self, edit) -> None:  # type: ignore[no-untyped-def]
        before = self.doc.get_state()
        edit(self.text)
        self.cache.applied(self.doc.get_update(before))

    def join(self) -> tuple[str, int]:
        frames = self.cache.frames(self.encode)
        return str(joiner(frames).get("text", type=pycrdt.Text)), len(frames)


def test_joins_follow_inserts_and_deletions_without_encoding_again() -> None:
    s = Source()
    s.change(lambda t: t.insert(0, "hello world"))
    assert s.join() == ("hello world", 1)
    assert s.join() == ("hello world", 1)
    s.change(lambda t: t.insert(5, ","))
    assert s.join() == ("hello, world", 2)  # one update, then the kept step 2
    s.change(lambda t: t.__delitem__(slice(0, 7)))  # a deletion: no new items
    assert s.join() == ("world", 2)
    assert s.encodings == 1


def test_updates_past_their_share_are_dropped_and_the_next_join_encodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(step2_cache, "MIN_BYTES", 0)
    monkeypatch.setattr(step2_cache, "MAX_UPDATES", 5)
    s = Source()
    s.change(lambda t: t.insert(0, "x" * 2000))
    s.join()
    for i in range(5):
        s.change(lambda t, i=i: t.insert(0, str(i)))
    assert s.join() == ("43210" + "x" * 2000, 2)
    assert s.encodings == 1
    s.change(lambda t: t.insert(0, "5"))  # the sixth: over the count
    assert s.cache.kept_bytes == 0
    assert s.join() == ("543210" + "x" * 2000, 1)
    assert s.encodings == 2
    s.change(lambda t: t.insert(0, "y" * 600))  # over a quarter of the kept size
    assert s.cache.kept_bytes == 0


def test_nothing_is_kept_before_the_first_join_or_after_a_drop() -> None:
    s = Source()
    s.change(lambda t: t.insert(0, "a"))
    assert s.cache.kept_bytes == 0
    s.join()
    assert s.cache.kept_bytes > 0
    s.cache.drop()
    assert s.cache.kept_bytes == 0
    assert s.join() == ("a", 1)


def test_a_seed_from_a_snapshot_and_later_updates_is_the_document() -> None:
    s = Source()
    s.change(lambda t: t.insert(0, "stored"))
    snapshot = s.doc.get_update()
    before = s.doc.get_state()
    s.text.insert(6, " and more")
    logged = s.doc.get_update(before)
    s.cache.seed(snapshot, [logged])
    assert s.join() == ("stored and more", 2)
    assert s.encodings == 0
    s.change(lambda t: t.__delitem__(slice(0, 7)))
    assert s.join() == ("and more", 2)
    assert s.encodings == 0
