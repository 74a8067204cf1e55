"""Sans-I/O y-websocket protocol: parse and build frames, byte for byte.

One WebSocket binary frame holds one message (y-websocket, y-protocols)::

    message      = varUint(type) payload
    type 0 sync  = varUint(step) varUint8Array(data)   step 0: state vector
                                                        step 1: update (reply to step 0)
                                                        step 2: update
    type 1 awareness = varUint8Array(awareness update)
         awareness update = varUint(n) n times (varUint(clientID) varUint(clock) varString(JSON))
    type 2 auth  = varUint(0 = permission denied) varString(reason)
    type 3 query awareness (no payload)

The decoder is our own and linear in the frame length (pycrdt's pure-Python reader
slices the buffer at every step, which is quadratic). Nothing here awaits, logs or
touches a socket.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgspec

from rooms.errors import BadMessage, MessageTooBig

# JavaScript clients encode integers up to 2**53; more is garbage or an attack.
MAX_VAR_UINT = 2**53 - 1


class MessageType(enum.IntEnum):
    SYNC = 0
    AWARENESS = 1
    AUTH = 2
    QUERY_AWARENESS = 3


class SyncStep(enum.IntEnum):
    STEP1 = 0
    STEP2 = 1
    UPDATE = 2


class ProtocolViolation(BadMessage):
    """A frame that is not a well-formed y-websocket message (close 4400)."""

    default_reason = "malformed y-websocket frame"


@dataclass(frozen=True, slots=True)
class SyncStep1:
    state_vector: bytes


@dataclass(frozen=True, slots=True)
class SyncStep2:
    update: bytes


@dataclass(frozen=True, slots=True)
class SyncUpdate:
    update: bytes


@dataclass(frozen=True, slots=True)
class AwarenessEntry:
    client_id: int
    clock: int
    state: str  # the JSON text as sent; "null" removes the client's state

    @property
    def removed(self) -> bool:
        return self.state == "null"


@dataclass(frozen=True, slots=True)
class AwarenessUpdate:
    entries: tuple[AwarenessEntry, ...]


@dataclass(frozen=True, slots=True)
class QueryAwareness:
    pass


@dataclass(frozen=True, slots=True)
class Auth:
    reason: str


Frame = SyncStep1 | SyncStep2 | SyncUpdate | AwarenessUpdate | QueryAwareness | Auth


class Reader:
    """A cursor over one frame; every read checks bounds."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def var_uint(self) -> int:
        buf, pos, result, shift = self.buf, self.pos, 0, 0
        while True:
            if pos >= len(buf):
                raise ProtocolViolation("truncated frame")
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 56:
                raise ProtocolViolation("integer too long")
        if result > MAX_VAR_UINT:
            raise ProtocolViolation("integer out of range")
        self.pos = pos
        return result

    def var_bytes(self) -> bytes:
        length = self.var_uint()
        end = self.pos + length
        if end > len(self.buf):
            raise ProtocolViolation("truncated frame")
        data = self.buf[self.pos : end]
        self.pos = end
        return data

    def var_string(self) -> str:
        try:
            return self.var_bytes().decode()
        except UnicodeDecodeError:
            raise ProtocolViolation("string is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolViolation("trailing bytes after the message")


def write_var_uint(number: int) -> bytes:
    if number < 0 or number > MAX_VAR_UINT:
        raise ValueError(f"var uint out of range: {number}")
    out = bytearray()
    while number > 0x7F:
        out.append(0x80 | (number & 0x7F))
        number >>= 7
    out.append(number)
    return bytes(out)


def write_var_bytes(data: bytes) -> bytes:
    return write_var_uint(len(data)) + data


_json = msgspec.json.Decoder()


def parse_frame(frame: bytes, *, max_frame_bytes: int) -> Frame:
    """Decode one client frame.

    Raises:
        MessageTooBig: the frame is over ``max_frame_bytes``.
        ProtocolViolation: anything else that is not a valid message.
    """
    if len(frame) > max_frame_bytes:
        raise MessageTooBig(f"frame over {max_frame_bytes} bytes")
    reader = Reader(frame)
    kind = reader.var_uint()
    result: Frame
    if kind == MessageType.SYNC:
        step = reader.var_uint()
        data = reader.var_bytes()
        if step == SyncStep.STEP1:
            result = SyncStep1(data)
        elif step == SyncStep.STEP2:
            result = SyncStep2(data)
        elif step == SyncStep.UPDATE:
            result = SyncUpdate(data)
        else:
            raise ProtocolViolation(f"unknown sync step {step}")
    elif kind == MessageType.AWARENESS:
        result = AwarenessUpdate(parse_awareness(reader.var_bytes()))
    elif kind == MessageType.QUERY_AWARENESS:
        result = QueryAwareness()
    elif kind == MessageType.AUTH:
        if reader.var_uint() != 0:
            raise ProtocolViolation("unknown auth message")
        result = Auth(reader.var_string())
    else:
        raise ProtocolViolation(f"unknown message type {kind}")
    reader.end()
    return result


def parse_awareness(payload: bytes) -> tuple[AwarenessEntry, ...]:
    """Decode an awareness update; each state must be JSON (an object or null)."""
    reader = Reader(payload)
    count = reader.var_uint()
    if count > len(payload):  # each entry takes at least three bytes
        raise ProtocolViolation("bad awareness count")
    entries = []
    for _ in range(count):
        client_id = reader.var_uint()
        clock = reader.var_uint()
        state = reader.var_string()
        try:
            value = _json.decode(state)
        except msgspec.DecodeError:
            raise ProtocolViolation("awareness state is not JSON") from None
        if value is not None and not isinstance(value, dict):
            raise ProtocolViolation("awareness state is not an object")
        entries.append(
            AwarenessEntry(client_id, clock, "null" if value is None else state)
        )
    reader.end()
    return tuple(entries)


def create_sync_step1(state_vector: bytes) -> bytes:
    return b"\x00\x00" + write_var_bytes(state_vector)


def create_sync_step2(update: bytes) -> bytes:
    return b"\x00\x01" + write_var_bytes(update)


def create_update(update: bytes) -> bytes:
    return b"\x00\x02" + write_var_bytes(update)


def encode_awareness(
    entries: tuple[AwarenessEntry, ...] | list[AwarenessEntry],
) -> bytes:
    parts = [write_var_uint(len(entries))]
    for e in entries:
        parts.append(write_var_uint(e.client_id))
        parts.append(write_var_uint(e.clock))
        parts.append(write_var_bytes(e.state.encode()))
    return b"".join(parts)


def create_awareness(
    entries: tuple[AwarenessEntry, ...] | list[AwarenessEntry],
) -> bytes:
    return b"\x01" + write_var_bytes(encode_awareness(entries))


def create_permission_denied(reason: str) -> bytes:
    return b"\x02\x00" + write_var_bytes(reason.encode())


def create_query_awareness() -> bytes:
    return b"\x03"
