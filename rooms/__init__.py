"""Rooms and the people in them: access, presence, chat, fan-out, and their HTTP API."""

from starlette.routing import WebSocketRoute

from rooms.access import Authenticator
from rooms.account_routes import routes as _account_routes
from rooms.admin_routes import routes as _admin_routes
from rooms.broker import Broker, Envelope, MemoryBroker, open_broker
from rooms.endpoint import RoomServices, SocketLimits, room_socket
from rooms.errors import CloseCode
from rooms.hub import RoomHub
from rooms.limits import FailureWindow
from rooms.metrics import Metrics
from rooms.presence import MemoryPresence, PresenceStore, open_presence

routes = [
    *_account_routes,
    *_admin_routes,
    WebSocketRoute("/ws/rooms/{room_id:int}", room_socket),
]

__all__ = [
    "Authenticator",
    "Broker",
    "CloseCode",
    "Envelope",
    "FailureWindow",
    "MemoryBroker",
    "MemoryPresence",
    "Metrics",
    "PresenceStore",
    "RoomHub",
    "RoomServices",
    "SocketLimits",
    "open_broker",
    "open_presence",
    "room_socket",
    "routes",
]
