"""Sans-I/O schemas of the room socket's JSON frames (``docs/protocol.md``).

``parse_client_message`` turns one text frame into a typed message or raises;
``create_*`` build the server's frames. Nothing here awaits, logs or reads a clock.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from rooms.call_messages import CallMessage

if TYPE_CHECKING:
    from storage.chat import StoredMessage

ClientId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**62)]


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    pass


class ChatSend(_Msg, tag="chat.send"):
    """Post a message; ``id`` is the client's own id, which makes retries idempotent."""

    id: ClientId
    text: str


class ChatEdit(_Msg, tag="chat.edit"):
    seq: Seq
    text: str
    id: ClientId | None = None


class ChatDelete(_Msg, tag="chat.delete"):
    seq: Seq
    id: ClientId | None = None


class ChatRead(_Msg, tag="chat.read"):
    """Mark everything up to ``seq`` as read (the unread marker)."""

    seq: Seq
    id: ClientId | None = None


class Typing(_Msg, tag="typing"):
    typing: bool
    id: ClientId | None = None


class Status(_Msg, tag="status"):
    status: Literal["active", "away"]
    id: ClientId | None = None


class Ping(_Msg, tag="ping"):
    id: ClientId | None = None


ClientMessage = (
    ChatSend | ChatEdit | ChatDelete | ChatRead | Typing | Status | Ping | CallMessage
)

_decoder = msgspec.json.Decoder(ClientMessage)
_any_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class InvalidMessage(Exception):
    """A well-formed JSON object that breaks the schema: answered with an error frame."""

    def __init__(
        self, detail: str, message_id: str | None = None, code: str = "invalid_message"
    ):
        super().__init__(detail)
        self.detail = detail
        self.message_id = message_id
        self.code = code


class NotJSON(Exception):
    """Not a JSON object at all: the connection is closed with 4400."""


def parse_client_message(frame: str | bytes, *, max_text_chars: int) -> ClientMessage:
    """Decode and validate one client frame.

    Raises:
        NotJSON: the frame is not a JSON object.
        InvalidMessage: a JSON object that is not a valid client message.
    """
    try:
        msg = _decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise _invalid(frame, exc) from None
    except msgspec.DecodeError:
        raise NotJSON("not JSON") from None
    text = getattr(msg, "text", None)
    if text is not None:
        if not text.strip():
            raise InvalidMessage("text is empty", getattr(msg, "id", None))
        if len(text) > max_text_chars:
            raise InvalidMessage(
                f"text is longer than {max_text_chars} characters",
                getattr(msg, "id", None),
                code="too_long",
            )
    return msg


def _invalid(frame: str | bytes, exc: msgspec.ValidationError) -> Exception:
    try:
        obj = _any_decoder.decode(frame)
    except msgspec.DecodeError:  # pragma: no cover - typed decode already parsed it
        return NotJSON("not JSON")
    if not isinstance(obj, dict):
        return NotJSON("not a JSON object")
    raw_id = obj.get("id")
    message_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= 64 else None
    return InvalidMessage(str(exc), message_id)


def encode(frame: dict[str, Any]) -> str:
    """Serialise a server frame (one JSON object) to text."""
    return _encoder.encode(frame).decode()


def iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def create_batches(texts: list[str], *, max_frames: int, max_chars: int) -> list[str]:
    """Group encoded frames into ``batch`` frames: one WebSocket message carrying what
    is queued for a connection, so a busy room costs one send per member per burst
    rather than one per frame. A single frame goes out as itself."""
    if len(texts) == 1:
        return texts
    out: list[str] = []
    group: list[str] = []
    size = 0
    for text in texts:
        if group and (len(group) >= max_frames or size + len(text) > max_chars):
            out.append(_batch(group))
            group, size = [], 0
        group.append(text)
        size += len(text) + 1
    if group:
        out.append(group[0] if len(group) == 1 else _batch(group))
    return out


def _batch(texts: list[str]) -> str:
    # The frames are JSON objects already: join them rather than re-encode.
    return '{"type":"batch","frames":[' + ",".join(texts) + "]}"


def create_error(code: str, message: str, message_id: str | None = None) -> str:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if message_id is not None:
        frame["id"] = message_id
    return encode(frame)


def create_chat_message(
    *,
    seq: int,
    client_id: str,
    author: dict[str, Any],
    text: str,
    created_at: dt.datetime,
    edited_at: dt.datetime | None = None,
    deleted: bool = False,
) -> str:
    return encode(
        {
            "type": "chat.message",
            "seq": seq,
            "id": client_id,
            "author": author,
            "text": "" if deleted else text,
            "created_at": iso(created_at),
            "edited_at": iso(edited_at),
            "deleted": deleted,
        }
    )


def create_stored_chat_message(m: StoredMessage) -> str:
    """The ``chat.message`` frame of a message read back from storage."""
    return create_chat_message(
        seq=m.seq,
        client_id=m.client_id,
        author={"id": m.author_id, "name": m.author_name},
        text=m.text,
        created_at=m.created_at,
        edited_at=m.edited_at,
        deleted=m.deleted,
    )


def create_chat_ack(client_id: str, seq: int, *, duplicate: bool = False) -> str:
    return encode(
        {"type": "chat.ack", "id": client_id, "seq": seq, "duplicate": duplicate}
    )


def create_chat_change(
    *, seq: int, edit_seq: int, text: str, edited_at: dt.datetime, deleted: bool
) -> str:
    return encode(
        {
            "type": "chat.deleted" if deleted else "chat.edited",
            "seq": seq,
            "edit_seq": edit_seq,
            "text": "" if deleted else text,
            "edited_at": iso(edited_at),
        }
    )
