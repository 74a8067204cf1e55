"""Coilroom server: settings, the app factory, and the command line.

    python server.py serve [--host HOST] [--port PORT] [--no-demo]
    python server.py migrate
    python server.py create-admin --email EMAIL

This is the only module that reads the environment (variables prefixed ``COILROOM_``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import getpass
import logging
import os
import re
import secrets
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rooms import (
    Authenticator,
    DocumentLimits,
    DocumentRegistry,
    FailureWindow,
    Metrics,
    RoomHub,
    RoomServices,
    SocketFront,
    SocketLimits,
    open_broker,
    open_presence,
)
from rooms import routes as room_routes
from rooms import sockets as room_sockets
from rooms.access import configure_password_hashing
from rooms.call_port import CallLimits
from rooms.http import (
    ApiError,
    api_error_handler,
    error_response,
    http_error_handler,
    internal_error_handler,
    json_response,
)
from rooms.ws_protocol import LeanWebSocketProtocol
from signaling import routes as call_routes
from signaling.echo import EchoService
from signaling.ice import IceConfig
from signaling.service import CallService
from signaling.store import open_call_store
from storage import open_database, run_migrations

log = logging.getLogger("coilroom")
ROOT = Path(__file__).resolve().parent
STATIC = ROOT / "static"


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, read from ``COILROOM_<NAME>``; the README lists them all."""

    host: str = _help("Address to listen on.", default="127.0.0.1")
    port: int = _help("Port to listen on.", default=8000)
    data_dir: str = _help(
        "Folder for the SQLite file and the generated secret key.", default="data"
    )
    database_url: str = _help(
        "SQLAlchemy URL. Empty: SQLite file in DATA_DIR. Production: "
        "postgresql+asyncpg://user@host/db.",
        default="",
    )
    redis_url: str = _help(
        "Redis URL for fan-out between processes. Empty: in-process broker (one process).",
        default="",
    )
    redis_prefix: str = _help(
        "Prefix of every Redis channel and key; servers sharing a Redis for one "
        "deployment use the same one, other deployments (or tests) another.",
        default="coilroom:",
    )
    presence_expiry: float = _help(
        "Seconds within which the members of a process that died are announced as "
        "gone (Redis only; under 30).",
        default=15.0,
    )
    broker_send_queue: int = _help(
        "Envelopes waiting to be written to Redis before further ones are dropped "
        "(and the other processes told to resync).",
        default=10_000,
    )
    broker_send_queue_bytes: int = _help(
        "Bytes waiting to be written to Redis before further envelopes are dropped.",
        default=64 << 20,
    )
    redis_timeout: float = _help(
        "Seconds to connect to Redis or wait for one of its answers.", default=2.0
    )
    secret_key: str = _help(
        "Key that signs room tokens. Empty: generated once and kept in DATA_DIR/secret_key.",
        default="",
        repr=False,
    )
    allowed_origins: str = _help(
        "Comma-separated origins (https://rooms.example.edu) whose pages may use the "
        "session cookie, besides the server's own origin.",
        default="",
    )
    cookie_secure: bool = _help(
        "Mark the session cookie Secure (set true behind HTTPS).", default=False
    )
    session_ttl: float = _help("Seconds a login session lasts.", default=12 * 3600.0)
    room_token_ttl: float = _help(
        "Default lifetime of a room token, seconds.", default=900.0
    )
    room_token_max_ttl: float = _help(
        "Longest lifetime a room token may ask for, seconds.", default=3600.0
    )
    invitation_ttl: float = _help(
        "Default lifetime of an invitation, seconds.", default=7 * 86400.0
    )
    max_frame_bytes: int = _help(
        "Largest WebSocket message accepted (close 1009 above).", default=64 * 1024
    )
    max_text_chars: int = _help("Longest chat message, in characters.", default=4000)
    messages_per_second: float = _help(
        "Messages a connection may send per second, on average.", default=10.0
    )
    message_burst: int = _help(
        "Messages a connection may send at once above the average rate; a client that keeps "
        "sending past it is closed with 4429.",
        default=30,
    )
    max_connections_per_user: int = _help(
        "Open room sockets per user on one server process.", default=10
    )
    send_queue_frames: int = _help(
        "Frames queued for one connection before it counts as too slow (closed with 1013).",
        default=1024,
    )
    open_timeout: float = _help(
        "Seconds allowed to authenticate a new socket.", default=10.0
    )
    typing_timeout: float = _help(
        "Seconds after which a silent 'typing' state clears.", default=6.0
    )
    heartbeat_interval: float = _help("Seconds between WebSocket pings.", default=20.0)
    heartbeat_timeout: float = _help(
        "Seconds to wait for a pong before dropping a connection.", default=20.0
    )
    close_timeout: float = _help(
        "Seconds to wait for a client to take a close frame.", default=5.0
    )
    login_attempts: int = _help(
        "Failed logins allowed per e-mail and address per window.", default=5
    )
    login_window: float = _help(
        "Window for counting failed logins, seconds.", default=300.0
    )
    doc_max_frame_bytes: int = _help(
        "Largest document socket message (a Yjs update or sync step), bytes (close 1009).",
        default=1 << 20,
    )
    doc_max_bytes: int = _help(
        "Largest stored size of one document, bytes; edits past it are refused.",
        default=32 << 20,
    )
    doc_updates_per_second: float = _help(
        "Document updates one connection may send per second on average (4429 above).",
        default=100.0,
    )
    doc_update_burst: int = _help(
        "Document updates one connection may send at once.", default=500
    )
    awareness_max_bytes: int = _help(
        "Largest awareness (cursor) state, bytes (1009 above).", default=8192
    )
    awareness_per_second: float = _help(
        "Awareness updates one connection may send per second on average (4429 above).",
        default=20.0,
    )
    awareness_flush_interval: float = _help(
        "Awareness changes within this many seconds go out as one message.",
        default=0.02,
    )
    doc_send_queue_frames: int = _help(
        "Frames queued for one document connection before it counts as too slow (1013).",
        default=4096,
    )
    doc_write_queue_updates: int = _help(
        "Updates waiting to be stored per document before edits are refused (1013).",
        default=10_000,
    )
    max_documents_per_room: int = _help(
        "Documents a room may have (the agreement and free-form ones); more are refused (4403).",
        default=100,
    )
    max_doc_connections_per_user: int = _help(
        "Open document sockets per user on one server process (4429 above).", default=20
    )
    doc_idle_unload: float = _help(
        "Seconds a document stays loaded after its last connection leaves.",
        default=30.0,
    )
    doc_compact_after_updates: int = _help(
        "Logged updates after which a document's log is folded into its snapshot.",
        default=500,
    )
    projection_delay: float = _help(
        "Seconds after an edit before the activity overview rows are refreshed.",
        default=1.0,
    )
    chat_queue_size: int = _help(
        "Chat messages waiting to be stored per room before 'busy'.", default=1000
    )
    chat_batch_size: int = _help(
        "Most chat messages stored in one transaction.", default=100
    )
    chat_linger: float = _help(
        "Seconds a room's writer waits for more messages before a commit (0: none); "
        "trades a little latency for fewer transactions and frames in busy rooms.",
        default=0.005,
    )
    call_max_participants: int = _help(
        "Most participants in one call (calls are a mesh: each sends to every other).",
        default=8,
    )
    call_max_sdp_bytes: int = _help(
        "Largest session description (offer or answer) relayed, bytes.",
        default=32 * 1024,
    )
    call_signals_per_second: float = _help(
        "Offers and answers a connection may send per second, on average.",
        default=5.0,
    )
    call_signal_burst: int = _help(
        "Offers and answers a connection may send at once above the average rate.",
        default=40,
    )
    call_candidates_per_second: float = _help(
        "ICE candidates a connection may send per second, on average.", default=40.0
    )
    call_candidate_burst: int = _help(
        "ICE candidates a connection may send at once above the average rate.",
        default=300,
    )
    stun_urls: str = _help(
        "STUN server URLs handed to call participants, comma-separated "
        "(empty: none; peers on one network need none).",
        default="",
    )
    turn_urls: str = _help(
        "TURN server URLs (e.g. `turn:turn.example.org:3478?transport=udp`), comma-separated; "
        "needs TURN_SECRET.",
        default="",
    )
    turn_secret: str = _help(
        "Shared secret of the TURN server (coturn `static-auth-secret`); never sent or logged.",
        default="",
        repr=False,
    )
    turn_ttl: float = _help(
        "Lifetime of the TURN credentials given to a call participant, seconds "
        "(longer than the longest call: TURN refreshes need them).",
        default=6 * 3600.0,
    )
    echo_max_sessions: int = _help(
        "Echo tests open at once on this process (each costs about 0.15-0.2 of a CPU "
        "core; 0 turns the echo test off).",
        default=2,
    )
    echo_max_seconds: float = _help("Longest echo test, seconds.", default=120.0)
    rtc_host_addresses: str = _help(
        "Addresses the server's own WebRTC peer (the echo test) offers as ICE host "
        "candidates, comma-separated (empty: every interface but loopback).",
        default="",
    )
    sqlite_synchronous: str = _help(
        "SQLite synchronous mode: FULL survives power loss; NORMAL only a crash of the process.",
        default="FULL",
    )
    password_time_cost: int = _help("argon2id passes per password hash.", default=3)
    password_memory_kib: int = _help(
        "argon2id memory per password hash, KiB.", default=64 * 1024
    )
    auto_migrate: bool = _help(
        "Upgrade the database schema when the server starts.", default=True
    )
    log_level: str = _help("Logging level.", default="info")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read ``COILROOM_*`` variables; unknown or malformed values are errors."""
        values: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for key, raw in environ.items():
            if not key.startswith("COILROOM_") or key == "COILROOM_ADMIN_PASSWORD":
                continue
            name = key.removeprefix("COILROOM_").lower()
            if name not in known:
                raise SystemExit(f"unknown setting {key}")
            kind = cls.__dataclass_fields__[name].type
            try:
                values[name] = _convert(raw, kind)
            except ValueError:
                raise SystemExit(f"bad value for {key}") from None
        return cls(**values)

    def resolved(self) -> Settings:
        """Fill in the derived defaults: database URL and secret key."""
        data = Path(self.data_dir)
        url = self.database_url or f"sqlite+aiosqlite:///{data / 'coilroom.db'}"
        key = self.secret_key or _load_or_create_key(data / "secret_key")
        if len(key) < 32:
            raise SystemExit("COILROOM_SECRET_KEY must be at least 32 characters")
        return dataclasses.replace(self, database_url=url, secret_key=key)


def settings_table() -> str:
    """The README's settings table, made from the fields' help strings."""
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = "(generated)" if f.name == "secret_key" else f.default
        rows.append(
            f"| `COILROOM_{f.name.upper()}` | `{default if default != '' else '(empty)'}` "
            f"| {f.metadata['help']} |"
        )
    return "\n".join(rows) + "\n"


def _convert(raw: str, kind: Any) -> Any:
    kind = str(kind)
    if kind == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(raw)
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    return raw


def _load_or_create_key(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    # Created readable by the owner only; never printed or logged.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key


class RedactSecrets(logging.Filter):
    """Keep tokens and invitation codes out of logs (uvicorn logs request paths)."""

    _pattern = re.compile(
        r"((?:token|code)=)[^&\s\"']+|(/invite/|/api/invitations/)[A-Za-z0-9_\-]{10,}"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self._pattern.sub(
            lambda m: (m.group(1) or m.group(2)) + "[redacted]", message
        )
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(RedactSecrets())
        logging.getLogger(name).addFilter(RedactSecrets())


class SecurityHeaders:
    """Strict headers on every HTTP response: no inline script, no framing, no sniffing."""

    CSP = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; media-src 'self' blob:; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'self'; object-src 'none'"
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        # Bundles have content-hashed names: a changed file is a new URL, so they can
        # be kept for good. Everything else (pages, API answers) is never stored.
        cache = (
            b"public, max-age=31536000, immutable"
            if scope["path"].startswith("/static/dist/")
            else b"no-store"
        )

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                headers.extend(
                    [
                        (b"content-security-policy", self.CSP.encode()),
                        (b"x-content-type-options", b"nosniff"),
                        (b"referrer-policy", b"no-referrer"),
                        (b"x-frame-options", b"DENY"),
                        (b"cache-control", cache),
                    ]
                )
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    checks: dict[str, str] = {}
    state = request.app.state
    for name, probe in (("database", state.db.ping), ("broker", state.broker.ping)):
        try:
            with anyio.fail_after(2.0):
                await probe()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            checks[name] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return json_response({"ready": ready, "checks": checks}, 200 if ready else 503)


async def metrics(request: Request) -> Response:
    return PlainTextResponse(
        request.app.state.metrics.render(), media_type="text/plain; version=0.0.4"
    )


@contextlib.asynccontextmanager
async def _echo_service(settings: Settings) -> AsyncIterator[EchoService | None]:
    """The echo-test peer, or None when it is turned off. Every peer connection it
    opened is closed when the server stops."""
    if settings.echo_max_sessions <= 0:
        yield None
        return
    addresses = [a.strip() for a in settings.rtc_host_addresses.split(",") if a.strip()]
    async with EchoService(
        max_sessions=settings.echo_max_sessions,
        max_seconds=settings.echo_max_seconds,
        host_addresses=addresses or None,
        # A client that vanished without hanging up is noticed in about 6 s.
        consent=(1.0, 4),
    ) as echo:
        yield echo


async def page(request: Request) -> Response:
    index = STATIC / "index.html"  # written by the build (static/build.mjs)
    if not index.exists():
        return PlainTextResponse(
            "The browser client is not built: run `make build` (`make run` does it).",
            status_code=503,
        )
    return FileResponse(index)


async def not_found(request: Request, exc: Exception) -> Response:
    if request.url.path.startswith("/api/"):
        return error_response(404, "not_found", "no such endpoint")
    return await http_error_handler(request, exc)


def _broker_options(settings: Settings) -> dict[str, Any]:
    if not settings.redis_url:
        return {}
    return {
        "channel_prefix": settings.redis_prefix,
        "send_queue_limit": settings.broker_send_queue,
        "send_queue_bytes": settings.broker_send_queue_bytes,
        "connect_timeout": settings.redis_timeout,
        "command_timeout": settings.redis_timeout,
    }


def _presence_options(settings: Settings) -> dict[str, Any]:
    if not settings.redis_url:
        return {}
    return {
        "key_prefix": settings.redis_prefix + "presence:",
        "expiry": settings.presence_expiry,
        "connect_timeout": settings.redis_timeout,
        "command_timeout": settings.redis_timeout,
    }


def _call_store_options(settings: Settings) -> dict[str, Any]:
    if not settings.redis_url:
        return {}
    return {
        "key_prefix": settings.redis_prefix + "calls:",
        "connect_timeout": settings.redis_timeout,
        "command_timeout": settings.redis_timeout,
    }


class _FanOutCollector:
    """Broker counters and resyncs for ``/metrics`` (read when scraped)."""

    def __init__(self, broker: Any, hub: RoomHub, documents: DocumentRegistry) -> None:
        self.broker = broker
        self.hub = hub
        self.documents = documents

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = getattr(self.broker, "stats", None)
        if stats is not None:
            for name in dataclasses.asdict(stats):
                yield CounterMetricFamily(
                    f"coilroom_broker_{name}",
                    f"Redis broker: {name.replace('_', ' ')}",
                    value=getattr(stats, name),
                )
            state = getattr(self.broker, "state", None)
            yield GaugeMetricFamily(
                "coilroom_broker_up",
                "1 while the broker's Redis subscriber connection is live",
                value=1.0 if state is not None and state.value == "live" else 0.0,
            )
        yield CounterMetricFamily(
            "coilroom_room_resyncs",
            "Room catch-ups from the database after broker losses",
            value=self.hub.resyncs,
        )
        yield CounterMetricFamily(
            "coilroom_document_resyncs",
            "Documents that applied missing updates from storage after a resync",
            value=self.documents.resynced,
        )


def create_app(settings: Settings | None = None) -> SocketFront:
    """Build the ASGI app. Resources open in the lifespan and close in reverse order."""
    settings = (settings or Settings.from_environ()).resolved()
    configure_password_hashing(
        time_cost=settings.password_time_cost, memory_kib=settings.password_memory_kib
    )
    app_metrics = Metrics()
    try:
        ice = IceConfig.from_settings(
            stun_urls=settings.stun_urls,
            turn_urls=settings.turn_urls,
            turn_secret=settings.turn_secret,
            turn_ttl=settings.turn_ttl,
        )
    except ValueError as exc:
        raise SystemExit(f"bad call settings: {exc}") from None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.auto_migrate:
            await anyio.to_thread.run_sync(run_migrations, settings.database_url)
        async with (
            open_database(
                settings.database_url, sqlite_synchronous=settings.sqlite_synchronous
            ) as db,
            open_broker(settings.redis_url, **_broker_options(settings)) as broker,
            _echo_service(settings) as echo,
            RoomHub(
                db=db,
                broker=broker,
                metrics=app_metrics,
                chat_queue_size=settings.chat_queue_size,
                chat_batch_size=settings.chat_batch_size,
                chat_linger=settings.chat_linger,
            ) as hub,
            DocumentRegistry(
                db=db,
                broker=broker,
                metrics=app_metrics,
                record=hub.record,
                limits=DocumentLimits(
                    max_frame_bytes=settings.doc_max_frame_bytes,
                    max_document_bytes=settings.doc_max_bytes,
                    max_awareness_bytes=settings.awareness_max_bytes,
                    awareness_per_second=settings.awareness_per_second,
                    awareness_burst=max(1, int(settings.awareness_per_second * 3)),
                    updates_per_second=settings.doc_updates_per_second,
                    update_burst=settings.doc_update_burst,
                    write_queue_updates=settings.doc_write_queue_updates,
                    send_queue_frames=settings.doc_send_queue_frames,
                    awareness_flush_interval=settings.awareness_flush_interval,
                    idle_unload=settings.doc_idle_unload,
                    compact_after_updates=settings.doc_compact_after_updates,
                    projection_delay=settings.projection_delay,
                    max_documents_per_room=settings.max_documents_per_room,
                    max_connections_per_user=settings.max_doc_connections_per_user,
                ),
            ) as documents,
            # After the hub: presence expiring on a dead process is announced
            # through it.
            open_presence(
                settings.redis_url,
                on_expired=hub.announce,
                **_presence_options(settings),
            ) as presence,
            # With Redis, calls span processes too, on presence's heartbeats.
            open_call_store(
                settings.redis_url, presence, **_call_store_options(settings)
            ) as call_store,
        ):
            hub.presence = presence
            app_metrics.registry.register(_FanOutCollector(broker, hub, documents))
            auth = Authenticator(
                secret_key=settings.secret_key,
                db=db,
                allowed_origins=[
                    o for o in settings.allowed_origins.split(",") if o.strip()
                ],
                room_token_ttl=settings.room_token_ttl,
                room_token_max_ttl=settings.room_token_max_ttl,
            )
            app.state.settings = settings
            app.state.db = db
            app.state.broker = broker
            app.state.auth = auth
            app.state.login_limiter = FailureWindow(
                settings.login_attempts, settings.login_window
            )
            app.state.documents = documents
            calls = CallService(
                hub=hub,
                limits=CallLimits(
                    max_participants=settings.call_max_participants,
                    max_sdp_bytes=settings.call_max_sdp_bytes,
                    signals_per_second=settings.call_signals_per_second,
                    signal_burst=settings.call_signal_burst,
                    candidates_per_second=settings.call_candidates_per_second,
                    candidate_burst=settings.call_candidate_burst,
                ),
                ice=ice,
                echo=echo,
                store=call_store,
            )
            if not settings.redis_url:
                # One process holds every call: any record still open is from a
                # previous run that stopped without closing it.
                await calls.close_interrupted()
            app.state.room_services = RoomServices(
                auth=auth,
                hub=hub,
                presence=presence,
                metrics=app_metrics,
                limits=SocketLimits(
                    max_frame_bytes=settings.max_frame_bytes,
                    max_text_chars=settings.max_text_chars,
                    messages_per_second=settings.messages_per_second,
                    message_burst=settings.message_burst,
                    max_connections_per_user=settings.max_connections_per_user,
                    send_queue_frames=settings.send_queue_frames,
                    open_timeout=settings.open_timeout,
                    typing_timeout=settings.typing_timeout,
                    close_timeout=settings.close_timeout,
                ),
                calls=calls,
            )
            # Everything made at start-up (modules, settings, caches) lives as long as
            # the process: move it out of the collector's sight, so the full
            # collections that come with traffic walk only what traffic made (tens of
            # milliseconds of a stalled event loop otherwise, bench/README.md).
            gc.collect()
            gc.freeze()
            yield

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        *room_routes,
        *call_routes,
        Route("/", page),
        Route("/room/{room_id:int}", page),
        Route("/invite/{code}", page),
        # Administration and dashboards are pages of the same browser client.
        Route("/admin", page),
        Route("/admin/{rest:path}", page),
        Route("/dashboard", page),
        Route("/dashboard/{rest:path}", page),
        # Only the build output is served: not the sources, the build script or
        # node_modules.
        Mount(
            "/static/dist",
            StaticFiles(directory=STATIC / "dist", check_dir=False),
            name="static",
        ),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_error_handler,
            404: not_found,
            Exception: internal_error_handler,
        },
    )
    app.state.metrics = app_metrics
    app.add_middleware(SecurityHeaders)
    return SocketFront(app, room_sockets)


# -- command line ----------------------------------------------------------------------

DEMO_PASSWORD = "coilroom-demo"  # noqa: S105 - the documented demo login
DEMO_USERS = (
    ("admin@demo.coilroom.test", "Alex Admin", "admin", None),
    ("coordinator@demo.coilroom.test", "Carmen Ortega", "coordinator", 0),
    ("ana@demo.coilroom.test", "Ana Morales", "instructor", 0),
    ("lars@demo.coilroom.test", "Lars Nielsen", "instructor", 1),
)


async def create_demo_data(database_url: str) -> bool:
    """Two institutions in two countries, one partnership with its room, a coordinator
    and two instructors (and an admin). Only into a database without users."""
    from sqlalchemy import func, select

    from rooms.access import hash_password
    from storage import admin as store
    from storage.models import MemberRole, User, UserRole

    async with open_database(database_url) as db:
        async with db.sessions() as session:
            if (
                await session.execute(select(func.count()).select_from(User))
            ).scalar_one():
                return False
        mx = await store.create_institution(
            db.sessions, "Universidad del Valle Central", "MX", "America/Mexico_City"
        )
        dk = await store.create_institution(
            db.sessions, "Nordhavn University", "DK", "Europe/Copenhagen"
        )
        password_hash = await hash_password(DEMO_PASSWORD)
        ids = {}
        for email, name, role, inst in DEMO_USERS:
            ids[email] = await store.create_user(
                db.sessions,
                email=email,
                name=name,
                password_hash=password_hash,
                institution_id=None if inst is None else (mx, dk)[inst],
                role=UserRole(role),
            )
        pid, _room = await store.create_partnership(
            db.sessions,
            title="Climate Futures: a COIL course between Guadalajara and Aarhus",
            goals="Students from both institutions compare local climate adaptation plans.",
            institution_ids=[mx, dk],
            created_by=ids["admin@demo.coilroom.test"],
            coordinator_id=ids["coordinator@demo.coilroom.test"],
        )
        for email in ("ana@demo.coilroom.test", "lars@demo.coilroom.test"):
            await store.set_member(db.sessions, pid, ids[email], MemberRole.INSTRUCTOR)
    return True


async def create_admin(database_url: str, email: str, name: str, password: str) -> int:
    from rooms.access import hash_password
    from storage import admin as store
    from storage.models import UserRole

    async with open_database(database_url) as db:
        return await store.create_user(
            db.sessions,
            email=email,
            name=name,
            password_hash=await hash_password(password),
            institution_id=None,
            role=UserRole.ADMIN,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="server.py", description="Coilroom server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--no-demo", action="store_true", help="do not create demo data")
    sub.add_parser("migrate", help="upgrade the database schema")
    sub.add_parser("settings-table", help="print the README's table of settings")
    admin_cmd = sub.add_parser("create-admin", help="create an administrator")
    admin_cmd.add_argument("--email", required=True)
    admin_cmd.add_argument("--name", default="Administrator")
    args = parser.parse_args(argv)

    if args.command == "settings-table":
        print(settings_table(), end="")
        return 0
    settings = Settings.from_environ()
    if args.command == "serve":
        if args.host:
            settings = dataclasses.replace(settings, host=args.host)
        if args.port is not None:
            settings = dataclasses.replace(settings, port=args.port)
    settings = settings.resolved()
    configure_logging(settings.log_level)
    configure_password_hashing(
        time_cost=settings.password_time_cost, memory_kib=settings.password_memory_kib
    )

    if args.command == "migrate":
        run_migrations(settings.database_url)
        print("database schema is up to date")
        return 0
    if args.command == "create-admin":
        password = os.environ.get("COILROOM_ADMIN_PASSWORD") or getpass.getpass(
            "Password: "
        )
        if len(password) < 10:
            print("the password needs at least 10 characters", file=sys.stderr)
            return 2
        run_migrations(settings.database_url)
        import asyncio

        try:
            user_id = asyncio.run(
                create_admin(settings.database_url, args.email, args.name, password)
            )
        except Exception as exc:  # noqa: BLE001 - reported to the operator in one line
            print(
                f"could not create the admin: {getattr(exc, 'message', exc)}",
                file=sys.stderr,
            )
            return 1
        print(f"admin {args.email} created (id {user_id})")
        return 0

    import asyncio

    import uvicorn

    run_migrations(settings.database_url)
    embedded = settings.database_url.startswith("sqlite") and not settings.redis_url
    demo = (
        embedded
        and not args.no_demo
        and asyncio.run(create_demo_data(settings.database_url))
    )
    url = f"http://{'localhost' if settings.host in ('127.0.0.1', '0.0.0.0') else settings.host}:{settings.port}/"
    print(f"\n  Coilroom is running at {url}", flush=True)
    if embedded and not args.no_demo:
        print(
            f"  Demo logins (password: {DEMO_PASSWORD}){' - created now' if demo else ''}:"
        )
        for email, name, role, _ in DEMO_USERS:
            print(f"    {email:34} {name} ({role})")
    print(flush=True)
    config = uvicorn.Config(
        "server:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # uvicorn's websockets-sansio protocol, minus what an idle socket need not keep.
        ws=LeanWebSocketProtocol,
        # No permessage-deflate: a compression context per socket costs hundreds of
        # KiB and CPU for every frame, for small JSON frames and CRDT updates.
        ws_per_message_deflate=False,
        # Our own limits are checked per socket; this only stops uvicorn buffering more.
        ws_max_size=max(settings.max_frame_bytes, settings.doc_max_frame_bytes),
        ws_ping_interval=settings.heartbeat_interval,
        ws_ping_timeout=settings.heartbeat_timeout,
        lifespan="on",
        proxy_headers=False,
        log_config=None,
        timeout_graceful_shutdown=10,
    )
    # The app factory reads the same environment; migrations already ran.
    os.environ["COILROOM_AUTO_MIGRATE"] = "false"
    os.environ.setdefault("COILROOM_DATA_DIR", settings.data_dir)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
