"""The room socket's JSON schemas, without sockets."""

from __future__ import annotations

import contextlib
import json

import pytest

from rooms.messages import (
    ChatEdit,
    ChatSend,
    InvalidMessage,
    NotJSON,
    Ping,
    Status,
    Typing,
    create_chat_ack,
    create_error,
    parse_client_message,
)


def parse(frame: object) -> object:
    return parse_client_message(json.dumps(frame), max_text_chars=100)


def test_parse_each_client_message() -> None:
    """Every documented client message parses into its typed form."""
    assert parse({"type": "chat.send", "id": "c1", "text": "hi"}) == ChatSend(
        id="c1", text="hi"
    )
    assert parse({"type": "chat.edit", "seq": 3, "text": "x"}) == ChatEdit(
        seq=3, text="x"
    )
    assert parse({"type": "typing", "typing": True}) == Typing(typing=True)
    assert parse({"type": "status", "status": "away"}) == Status(status="away")
    assert parse({"type": "ping"}) == Ping()


@pytest.mark.parametrize(
    ("frame", "message_id"),
    [
        ({"type": "chat.send", "id": "a", "text": 1}, "a"),
        ({"type": "chat.send", "id": "b"}, "b"),
        ({"type": "nope", "id": "c"}, "c"),
        ({"type": "status", "status": "asleep", "id": "d"}, "d"),
        ({"type": "chat.send", "id": "e", "text": "x", "more": 1}, "e"),
        ({"type": "chat.edit", "seq": -5, "text": "x", "id": "f"}, "f"),
        ({"id": "g"}, "g"),
        ({"type": "chat.send", "id": "x" * 65, "text": "t"}, None),
        ({"type": "chat.send", "id": 7, "text": "t"}, None),
    ],
)
def test_schema_errors_name_the_message_id(
    frame: object, message_id: str | None
) -> None:
    """A JSON object that breaks the schema raises InvalidMessage with its id when usable."""
    with pytest.raises(InvalidMessage) as caught:
        parse(frame)
    assert caught.value.message_id == message_id


@pytest.mark.parametrize(
    "raw", ["", "nope", "[1]", "3", '"s"', "null", "{", b"\xff\xfe"]
)
def test_non_objects_are_not_json(raw: str | bytes) -> None:
    """Anything that is not a JSON object raises NotJSON (close 4400)."""
    with pytest.raises(NotJSON):
        parse_client_message(raw, max_text_chars=100)


def test_text_limits() -> None:
    """Blank text and text over the limit are refused with their own codes."""
    with pytest.raises(InvalidMessage) as caught:
        parse({"type": "chat.send", "id": "a", "text": "y" * 101})
    assert caught.value.code == "too_long"
    with pytest.raises(InvalidMessage) as caught:
        parse({"type": "chat.send", "id": "a", "text": " \n "})
    assert caught.value.code == "invalid_message"


def test_server_frames_are_json_objects() -> None:
    """Server frames encode to the documented JSON."""
    assert json.loads(create_chat_ack("c", 4)) == {
        "type": "chat.ack",
        "id": "c",
        "seq": 4,
        "duplicate": False,
    }
    assert json.loads(create_error("busy", "later", "c")) == {
        "type": "error",
        "code": "busy",
        "message": "later",
        "id": "c",
    }
    assert "id" not in json.loads(create_error("busy", "later"))


def test_random_bytes_never_escape_the_documented_errors() -> None:
    """Fuzz: arbitrary input either parses or raises NotJSON / InvalidMessage."""
    import random

    rng = random.Random(1234)
    alphabet = '{}[]":,0123456789.-truefalsnul typechat.sendidtext\\u'
    for _ in range(5000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        with contextlib.suppress(NotJSON, InvalidMessage):
            parse_client_message(raw, max_text_chars=10)


def test_batches_group_frames_within_limits() -> None:
    """Queued frames become batch frames; a lone frame stays itself; limits split them."""
    from rooms.messages import create_batches

    one = json.dumps({"type": "pong"})
    assert create_batches([one], max_frames=10, max_chars=1000) == [one]
    frames = [
        json.dumps({"type": "chat.ack", "id": f"c{i}", "seq": i}) for i in range(7)
    ]
    out = create_batches(frames, max_frames=3, max_chars=10_000)
    assert len(out) == 3
    decoded = [json.loads(m) for m in out]
    assert [d["type"] for d in decoded] == ["batch", "batch", "chat.ack"]
    flat = [f for d in decoded for f in (d["frames"] if d["type"] == "batch" else [d])]
    assert [f["seq"] for f in flat] == list(range(7))
    by_size = create_batches(frames, max_frames=100, max_chars=len(frames[0]) * 2 + 2)
    assert all(len(json.loads(m).get("frames", [None])) <= 2 for m in by_size)
