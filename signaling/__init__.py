"""Calls: who is in a room's call, relaying offers/answers/ICE candidates between its
peers, media state, ICE servers with short-lived TURN credentials, call records, and
the server's own echo-test peer."""

from signaling.routes import routes

__all__ = ["routes"]
