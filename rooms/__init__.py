"""Rooms and the people in them: access, presence, chat, fan-out, and their HTTP API."""

from rooms.access import Authenticator
from rooms.account_routes import routes as _account_routes
from rooms.admin_routes import routes as _admin_routes
from rooms.broker import Broker, Envelope, MemoryBroker, open_broker
from rooms.dashboard_routes import routes as _dashboard_routes
from rooms.doc_endpoint import doc_socket
from rooms.document_routes import routes as _document_routes
from rooms.documents import DocumentLimits, DocumentRegistry
from rooms.endpoint import RoomServices, SocketLimits, room_socket
from rooms.errors import CloseCode
from rooms.hub import RoomHub
from rooms.limits import FailureWindow
from rooms.metrics import Metrics
from rooms.presence import MemoryPresence, PresenceStore, open_presence
from rooms.socket import SocketFront

routes = [*_account_routes, *_admin_routes, *_document_routes, *_dashboard_routes]
# Served by SocketFront, ahead of the HTTP middleware and routing.
sockets = {
    "/ws/rooms/{room_id}": room_socket,
    "/ws/docs/{room_id}/{doc_name}": doc_socket,
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
