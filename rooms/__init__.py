"""Rooms and the people in them: access, presence, chat, fan-out, and their HTTP API.

The names below are loaded on first use (PEP 562), not when the package is: the
document worker imports ``rooms.worker`` and ``rooms.projection`` and must not pay
for Starlette, SQLAlchemy and every route (about 100 MiB per server process).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "Authenticator": "rooms.access",
    "Broker": "rooms.broker",
    "Envelope": "rooms.broker",
    "MemoryBroker": "rooms.broker",
    "open_broker": "rooms.broker",
    "doc_socket": "rooms.doc_endpoint",
    "DocumentLimits": "rooms.documents",
    "DocumentRegistry": "rooms.documents",
    "RoomServices": "rooms.endpoint",
    "SocketLimits": "rooms.endpoint",
    "room_socket": "rooms.endpoint",
    "CloseCode": "rooms.errors",
    "RoomHub": "rooms.hub",
    "FailureWindow": "rooms.limits",
    "Metrics": "rooms.metrics",
    "MemoryPresence": "rooms.presence",
    "PresenceStore": "rooms.presence",
    "open_presence": "rooms.presence",
    "SocketFront": "rooms.socket",
}

__all__ = [
    "Authenticator",
    "Broker",
    "CloseCode",
    "DocumentLimits",
    "DocumentRegistry",
    "Envelope",
    "FailureWindow",
    "MemoryBroker",
    "MemoryPresence",
    "Metrics",
    "PresenceStore",
    "RoomHub",
    "RoomServices",
    "SocketFront",
    "SocketLimits",
    "doc_socket",
    "open_broker",
    "open_presence",
    "room_socket",
    "routes",
    "sockets",
]


def _routes() -> list[Any]:
    from rooms.account_routes import routes as account
    from rooms.admin_routes import routes as admin
    from rooms.dashboard_routes import routes as dashboard
    from rooms.document_routes import routes as document

    return [*account, *admin, *document, *dashboard]


def _sockets() -> dict[str, Any]:
    from rooms.doc_endpoint import doc_socket
    from rooms.endpoint import room_socket

    # Served by SocketFront, ahead of the HTTP middleware and routing.
    return {
        "/ws/rooms/{room_id}": room_socket,
        "/ws/docs/{room_id}/{doc_name}": doc_socket,
    }


def __getattr__(name: str) -> Any:
    if name == "routes":
        value: Any = _routes()
    elif name == "sockets":
        value = _sockets()
    elif name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once loaded, a plain attribute
    return value


if TYPE_CHECKING:
    from rooms.access import Authenticator
    from rooms.broker import Broker, Envelope, MemoryBroker, open_broker
    from rooms.doc_endpoint import doc_socket
    from rooms.documents import DocumentLimits, DocumentRegistry
    from rooms.endpoint import RoomServices, SocketLimits, room_socket
    from rooms.errors import CloseCode
    from rooms.hub import RoomHub
    from rooms.limits import FailureWindow
    from rooms.metrics import Metrics
    from rooms.presence import MemoryPresence, PresenceStore, open_presence
    from rooms.socket import SocketFront

    routes: list[Any]
    sockets: dict[str, Any]
