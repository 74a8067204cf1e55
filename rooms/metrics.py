"""Prometheus metrics of one process (``GET /metrics``).

Each app gets its own registry, so several apps in one process (tests) never clash.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class Metrics:
    """The counters, gauges and histograms Coilroom exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "coilroom_connections", "Open room socket connections", registry=r
        )
        self.rooms = Gauge(
            "coilroom_rooms_active", "Rooms with members on this process", registry=r
        )
        self.connections_total = Counter(
            "coilroom_connections_opened",
            "Room socket connections accepted",
            registry=r,
        )
        self.closes = Counter(
            "coilroom_connections_closed",
            "Connections closed, by close code",
            ["code"],
            registry=r,
        )
        self.messages = Counter(
            "coilroom_chat_messages_stored",
            "Chat messages stored (not counting retries)",
            registry=r,
        )
        self.client_errors = Counter(
            "coilroom_client_errors",
            "Error frames sent to clients, by code",
            ["code"],
            registry=r,
        )
        self.internal_errors = Counter(
            "coilroom_internal_errors", "Unexpected server errors", registry=r
        )
        self.frames_sent = Counter(
            "coilroom_frames_sent", "Frames queued to room sockets and sent", registry=r
        )
        self.socket_messages_sent = Counter(
            "coilroom_socket_messages_sent",
            "WebSocket messages sent on room sockets (a batch carries several frames), "
            "written directly or by a task that waited for a slow socket",
            ["path"],
            registry=r,
        )
        self.doc_messages_sent = Counter(
            "coilroom_document_messages_sent",
            "y-websocket messages sent on document sockets, written directly or by a "
            "task that waited for a slow socket",
            ["path"],
            registry=r,
        )
        self.slow_consumers = Counter(
            "coilroom_slow_consumers",
            "Connections closed because their queue was full",
            registry=r,
        )
        self.events_dropped = Counter(
            "coilroom_activity_events_dropped",
            "Activity events dropped because the event queue was full",
            registry=r,
        )
        self.documents = Gauge(
            "coilroom_documents_loaded", "Live documents on this process", registry=r
        )
        self.doc_connections = Gauge(
            "coilroom_document_connections",
            "Open document socket connections",
            registry=r,
        )
        self.doc_updates = Counter(
            "coilroom_document_updates_stored",
            "Document updates stored and broadcast",
            registry=r,
        )
        self.doc_updates_rejected = Counter(
            "coilroom_document_updates_rejected",
            "Document updates refused as invalid",
            registry=r,
        )
        self.compactions = Counter(
            "coilroom_document_compactions",
            "Update logs folded into snapshots",
            registry=r,
        )
        self.calls = Gauge(
            "coilroom_calls_live",
            "Live calls with a participant connected to this process",
            registry=r,
        )
        self.call_participants = Gauge(
            "coilroom_call_participants",
            "Connections in a call on this process",
            registry=r,
        )
        self.signals = Counter(
            "coilroom_call_signals_relayed",
            "Offers, answers and ICE candidates relayed",
            ["kind"],
            registry=r,
        )
        self.echo_sessions = Gauge(
            "coilroom_echo_sessions", "Echo test sessions open", registry=r
        )
        self.chat_commit_seconds = Histogram(
            "coilroom_chat_commit_seconds",
            "Time from receiving a chat message to its commit",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.chat_batch_size = Histogram(
            "coilroom_chat_batch_size",
            "Chat messages per database transaction",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200),
            registry=r,
        )
        self.http_seconds = Histogram(
            "coilroom_http_request_seconds",
            "HTTP API latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
