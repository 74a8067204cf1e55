"""HTTP API for documents: named versions (list, create, read, restore), the edit
history, and the activity overview projected from each room's ``agreement``."""

from __future__ import annotations

from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rooms import crdt
from rooms.doc_endpoint import DOC_NAME
from rooms.documents import DocumentRegistry
from rooms.errors import TryAgainLater
from rooms.http import (
    ApiError,
    json_response,
    path_int,
    query_int,
    read_body,
    room_member,
)
from storage import documents as store
from storage.accounts import RoomAccess, UserInfo
from storage.events import EventRow, list_events
from storage.models import MemberRole


class NewVersion(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


async def _member(
    request: Request, *, write: bool = False
) -> tuple[UserInfo, RoomAccess]:
    user, access = await room_member(request)
    if write and access.role == MemberRole.OBSERVER:
        raise ApiError(403, "read_only", "observers cannot change documents")
    return user, access


def _doc_name(request: Request) -> str:
    name = request.path_params["doc_name"]
    if not DOC_NAME.fullmatch(name):
        raise ApiError(404, "not_found", "no such document: names are [a-z0-9-]{1,64}")
    return str(name)


def _registry(request: Request) -> DocumentRegistry:
    return request.app.state.documents  # type: ignore[no-any-return]


async def activities(request: Request) -> Response:
    """The room's activities as projected from its ``agreement`` document."""
    _, access = await _member(request)
    rows = await store.list_activities(request.app.state.db.sessions, access.room_id)
    return json_response({"activities": rows})


async def versions(request: Request) -> Response:
    name = _doc_name(request)
    sessions = request.app.state.db.sessions
    if request.method == "GET":
        _, access = await _member(request)
        doc_id = await store.document_id(sessions, access.room_id, name)
        return json_response({"versions": await store.list_versions(sessions, doc_id)})
    user, access = await _member(request, write=True)
    body = await read_body(request, NewVersion)
    try:
        async with _registry(request).use(access.room_id, name) as doc:
            # The live copy equals what is stored, so this is the stored state.
            state = doc.doc.get_update()
            doc_id = doc.document_id
    except TryAgainLater as exc:
        raise ApiError(503, "unavailable", exc.reason) from None
    version = await store.create_version(sessions, doc_id, body.name, state, user.id)
    request.app.state.room_services.hub.record(
        EventRow(
            "version_created",
            access.room_id,
            user.id,
            {"document": name, "version": version["id"]},
        )
    )
    return json_response(version, 201)


async def version(request: Request) -> Response:
    """One version's content, as plain JSON (the document's roots)."""
    _, access = await _member(request)
    name = _doc_name(request)
    sessions = request.app.state.db.sessions
    doc_id = await store.document_id(sessions, access.room_id, name)
    state = await store.version_state(sessions, doc_id, path_int(request, "version_id"))
    if state is None:
        raise ApiError(404, "not_found", "no such version")
    listed = {v["id"]: v for v in await store.list_versions(sessions, doc_id)}
    return json_response(
        {
            **listed[path_int(request, "version_id")],
            "content": crdt.content(crdt.build([state])),
        }
    )


async def restore(request: Request) -> Response:
    """Restore a version: a new edit that makes the document read like it again."""
    user, access = await _member(request, write=True)
    name = _doc_name(request)
    sessions = request.app.state.db.sessions
    doc_id = await store.document_id(sessions, access.room_id, name)
    version_id = path_int(request, "version_id")
    state = await store.version_state(sessions, doc_id, version_id)
    if state is None:
        raise ApiError(404, "not_found", "no such version")
    try:
        async with _registry(request).use(access.room_id, name) as doc:
            update = crdt.restore_update(doc.doc, state)
            await doc.write(user.id, update)
    except TryAgainLater as exc:
        raise ApiError(503, "unavailable", exc.reason) from None
    request.app.state.room_services.hub.record(
        EventRow(
            "version_restored",
            access.room_id,
            user.id,
            {"document": name, "version": version_id},
        )
    )
    return json_response({"restored": version_id, "bytes": len(update)})


async def edits(request: Request) -> Response:
    """Who edited the document and when (edit events, newest first)."""
    _, access = await _member(request)
    name = _doc_name(request)
    limit = query_int(request, "limit", 100, low=1, high=1000)
    assert limit is not None
    rows = await list_events(
        request.app.state.db.sessions,
        room_id=access.room_id,
        kinds=("edit", "version_created", "version_restored"),
        document=name,
        limit=limit,
    )
    return json_response({"edits": rows})


D = "/api/rooms/{room_id}/documents/{doc_name}"
routes = [
    Route("/api/rooms/{room_id}/activities", activities, methods=["GET"]),
    Route(D + "/versions", versions, methods=["GET", "POST"]),
    Route(D + "/versions/{version_id}", version, methods=["GET"]),
    Route(D + "/versions/{version_id}/restore", restore, methods=["POST"]),
    Route(D + "/edits", edits, methods=["GET"]),
]
