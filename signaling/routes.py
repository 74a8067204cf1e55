"""HTTP API for calls: a room's call history (sessions and who was in them)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rooms.http import json_response, query_int, room_member
from storage.calls import room_calls


async def calls(request: Request) -> Response:
    """``GET /api/rooms/{room_id}/calls?before=ID&limit=N``: newest first."""
    _, access = await room_member(request)
    before = query_int(request, "before", None, low=1, high=2**62)
    limit = query_int(request, "limit", 20, low=1, high=100)
    assert limit is not None
    async with request.app.state.db.sessions() as session:
        records = await room_calls(session, access.room_id, before=before, limit=limit)
    live = await request.app.state.room_services.calls.snapshot(access.room_id)
    return json_response({"calls": [r.as_json() for r in records], "live": live})


routes = [Route("/api/rooms/{room_id:int}/calls", calls, methods=["GET"])]
