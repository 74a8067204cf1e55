"""Pure state: presence aggregation, rate limits, the outbox."""

from __future__ import annotations

import pytest

from rooms.limits import FailureWindow, TokenBucket
from rooms.outbox import Outbox, OutboxFull
from rooms.presence import PresenceBook, PresenceUser

ANA = PresenceUser(1, "Ana", "Valle Central", "MX")
LARS = PresenceUser(2, "Lars", "Nordhavn", "DK")


def test_presence_aggregates_tabs_per_user() -> None:
    """Online while any tab lives; join on the first, leave on the last."""
    book = PresenceBook()
    assert book.add(10, "t1", ANA).kind == "join"
    assert book.add(10, "t2", ANA).kind == "none"
    assert book.add(10, "t3", LARS).kind == "join"
    assert [p.user.id for p in book.snapshot(10)] == [1, 2]
    assert book.snapshot(10)[0].connections == 2
    assert book.remove(10, "t1").kind == "none"
    assert book.remove(10, "t2").kind == "leave"
    assert book.remove(10, "t2").kind == "none"  # twice is harmless
    assert [p.user.id for p in book.snapshot(10)] == [2]


def test_presence_status_and_typing_across_tabs() -> None:
    """Away only when every tab is away; typing when any tab types."""
    book = PresenceBook()
    book.add(1, "a", ANA)
    book.add(1, "b", ANA)
    assert book.update(1, "a", status="away").kind == "none"  # tab b is still active
    change = book.update(1, "b", status="away")
    assert change.kind == "update" and change.after and change.after.status == "away"
    change = book.update(1, "a", typing=True)
    assert change.after and change.after.typing
    change = book.remove(1, "a")
    assert change.kind == "update" and change.after and not change.after.typing


def test_presence_rooms_are_separate() -> None:
    """Presence in one room says nothing of another."""
    book = PresenceBook()
    book.add(1, "a", ANA)
    assert book.snapshot(2) == []
    assert book.update(2, "a", typing=True).kind == "none"


def test_token_bucket_allows_burst_then_rate() -> None:
    """A burst passes at once; after it, one event per 1/rate seconds."""
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after() == pytest.approx(0.1)
    assert bucket.take(0.1)
    assert not bucket.take(0.1)
    assert bucket.take(10.0) and bucket.take(10.0) and bucket.take(10.0)
    assert not bucket.take(10.0)


def test_failure_window_blocks_and_forgets() -> None:
    """Failures past the limit block the key until the window slides past them."""
    window = FailureWindow(limit=2, window=60)
    window.fail("k", 0)
    assert window.blocked_for("k", 1) == 0
    window.fail("k", 1)
    assert window.blocked_for("k", 2) == pytest.approx(58)
    assert window.blocked_for("other", 2) == 0
    assert window.blocked_for("k", 61) == 0
    window.clear("k")
    assert window.blocked_for("k", 61) == 0


def test_failure_window_memory_is_bounded() -> None:
    """A spray of distinct keys cannot grow memory past max_keys."""
    window = FailureWindow(limit=1, window=60, max_keys=100)
    for i in range(1000):
        window.fail(f"k{i}", 0)
    assert len(window._hits) <= 100


def test_outbox_bound_and_drain() -> None:
    """put never blocks; past the bound it raises; drain takes everything, in order."""
    box = Outbox(3)
    box.put("a", 1)
    box.put(b"b")
    box.put("c", 2)
    with pytest.raises(OutboxFull):
        box.put("d")
    assert box.drain() == [(1, "a"), (0, b"b"), (2, "c")]
    assert box.drain() == []
    box.put("e")
    assert len(box) == 1
    box.close()
    box.put("ignored")
    assert box.drain() == []
