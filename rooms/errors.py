"""Close codes and the errors that end one connection.

Hierarchy (each error carries the close code it is sent with)::

    RoomError                    1011 internal error, no details sent
    ├── BadMessage               4400 malformed frame (not JSON, binary on a JSON socket)
    ├── MessageTooBig            1009 frame over the configured limit
    ├── NotAuthenticated         4401 missing, forged or expired credentials
    ├── Forbidden                4403 not a member, or a cookie from a foreign Origin
    ├── RoomNotFound             4404 no such room
    ├── RateLimited              4429 flooding, or too many connections for one user
    └── TryAgainLater            1013 slow consumer, server busy: reconnect and resume
"""

from __future__ import annotations

import enum
from typing import ClassVar


class CloseCode(enum.IntEnum):
    """WebSocket close codes sent by Coilroom (4000-4999 are private use, RFC 6455 §7.4.2)."""

    NORMAL = 1000
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_MESSAGE = 4400
    NOT_AUTHENTICATED = 4401
    FORBIDDEN = 4403
    NOT_FOUND = 4404
    RATE_LIMITED = 4429


class RoomError(Exception):
    """Root of the errors that end one member's connection. Never used for bugs."""

    close_code: ClassVar[CloseCode] = CloseCode.INTERNAL_ERROR
    default_reason: ClassVar[str] = "internal error"

    def __init__(self, reason: str | None = None) -> None:
        # The reason goes to the client: short (the close frame allows 123 bytes)
        # and free of internals.
        self.reason = (reason or self.default_reason)[:120]
        super().__init__(self.reason)


class BadMessage(RoomError):
    close_code = CloseCode.BAD_MESSAGE
    default_reason = "malformed message"


class MessageTooBig(RoomError):
    close_code = CloseCode.MESSAGE_TOO_BIG
    default_reason = "message too big"


class NotAuthenticated(RoomError):
    close_code = CloseCode.NOT_AUTHENTICATED
    default_reason = "not authenticated"


class Forbidden(RoomError):
    close_code = CloseCode.FORBIDDEN
    default_reason = "not a member of this room"


class RoomNotFound(RoomError):
    close_code = CloseCode.NOT_FOUND
    default_reason = "no such room"


class RateLimited(RoomError):
    close_code = CloseCode.RATE_LIMITED
    default_reason = "rate limited"


class TryAgainLater(RoomError):
    close_code = CloseCode.TRY_AGAIN_LATER
    default_reason = "try again later"


class SlowConsumer(TryAgainLater):
    default_reason = "send queue full: reconnect and resume"
