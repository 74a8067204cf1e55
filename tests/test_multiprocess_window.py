"""The sequence window a room keeps so a resync sends only what it did not deliver."""

from __future__ import annotations

from rooms.hub import SeqWindow


def test_out_of_order_sequences_close_the_gap() -> None:
    window = SeqWindow()
    window.note(3)  # arrived before the first member's welcome
    window.start(1)
    assert window.mark == 1 and window.seen == {3}
    assert window.has(1) and not window.has(2) and window.has(3)
    window.note(2)
    assert window.mark == 3 and not window.seen


def test_start_only_once_and_advance_never_goes_back() -> None:
    window = SeqWindow()
    window.start(10)
    window.start(4)
    assert window.mark == 10
    window.note(12)
    window.advance_to(11)
    assert window.mark == 12 and not window.seen
    window.advance_to(5)
    assert window.mark == 12


def test_a_hole_that_never_fills_is_skipped_past_the_bound() -> None:
    window = SeqWindow()
    window.start(0)
    for seq in range(2, 2 + SeqWindow.MAX_SEEN + 1):
        window.note(seq)
    assert window.mark == 1 + SeqWindow.MAX_SEEN + 1
    assert not window.seen
