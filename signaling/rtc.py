"""Small aiortc helpers shared by the server's own peers (the echo test) and tests.

Two things are needed to run aiortc peers on a machine without internet:

* ``iceServers=[]``: aiortc's default is Google's public STUN server, which costs a
  gathering timeout when unreachable and leaks the server's address when reachable.
  With no ICE servers only host candidates are gathered (enough on a LAN and over
  loopback; TURN is for the browsers' mesh, not for the echo peer).
* the host addresses candidates are gathered on. aioice's
  ``aioice.ice.get_host_addresses()`` enumerates every interface address except
  ``127.0.0.1`` (and IPv6 link-local ones), so two peers that can only reach each
  other over loopback never connect. :func:`restrict_host_addresses` replaces that
  enumeration with a fixed list.

The restriction is process-wide because aioice offers no per-connection knob:
``Connection.gather_candidates()`` calls the module-level ``get_host_addresses()``
and aiortc builds its ``aioice.Connection`` inside ``RTCIceGatherer`` without a way
to pass addresses. Patching that one module attribute (looked up at call time) is
the narrowest hook; it affects every peer connection of the process gathering
after the call, which is what a server setting wants anyway (one process, one
network identity).

A third knob decides how fast a peer that vanished (process killed, network gone,
no DTLS close_notify) is noticed: ICE consent freshness (RFC 7675). aioice sends a
consent check every ``CONSENT_INTERVAL`` (5 s, randomised x0.8-1.2) without
retransmission (each check times out after 0.5 s) and gives up after
``CONSENT_FAILURES`` (6) failures in a row, so about 30 s. Giving up closes the ICE
connection, aiortc's DTLS transport closes, and the RTCPeerConnection closes
itself. :func:`set_consent_freshness` shortens it; it is process-wide for the same
reason (module constants read by ``Connection.query_consent()``). A peer that
closes its RTCPeerConnection normally sends a DTLS close_notify and is noticed at
once, whatever this setting.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable, Iterator, Sequence

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

__all__ = [
    "DEFAULT_CONSENT_FAILURES",
    "DEFAULT_CONSENT_INTERVAL",
    "consent_freshness",
    "create_peer_connection",
    "host_address_restriction",
    "restrict_host_addresses",
    "restricted_host_addresses",
    "set_consent_freshness",
]

# aioice's own enumeration, kept to fall back on when no restriction is set.
_enumerate_host_addresses = aioice.ice.get_host_addresses
_restriction: tuple[str, ...] | None = None
# aioice's defaults (RFC 7675 §5.1: checks every 5 s, consent lost after 30 s).
DEFAULT_CONSENT_INTERVAL: float = aioice.ice.CONSENT_INTERVAL
DEFAULT_CONSENT_FAILURES: int = aioice.ice.CONSENT_FAILURES


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    """Stand in for ``aioice.ice.get_host_addresses`` (same signature)."""
    if _restriction is None:
        return _enumerate_host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
    wanted = {4: use_ipv4, 6: use_ipv6}
    return [a for a in _restriction if wanted[ipaddress.ip_address(a).version]]


def restrict_host_addresses(addresses: Iterable[str] | None) -> None:
    """Gather ICE host candidates only on ``addresses``, for the whole process.

    Unlike aioice's default, the list may hold loopback addresses: call
    ``restrict_host_addresses(["127.0.0.1"])`` to make peers on the same machine
    reach each other with no other interface involved. ``None`` restores aioice's
    enumeration of every interface (loopback excluded). Only peer connections that
    gather after the call are affected. A server calls this once at startup from
    its setting (see the module docstring for why it is process-wide).

    Args:
        addresses: literal IPv4/IPv6 addresses of this host, or ``None``.

    Raises:
        ValueError: an entry is not an IP address literal, or the list is empty
            (no candidates at all could never connect).
    """
    global _restriction
    if addresses is None:
        _restriction = None
        return
    parsed = tuple(str(ipaddress.ip_address(a)) for a in addresses)
    if not parsed:
        raise ValueError("host addresses: give at least one address, or None")
    # Installed once and left in place: with no restriction it defers to aioice.
    aioice.ice.get_host_addresses = _get_host_addresses
    _restriction = parsed


def restricted_host_addresses() -> tuple[str, ...] | None:
    """Return the current process-wide restriction (``None``: every interface)."""
    return _restriction


@contextlib.contextmanager
def host_address_restriction(addresses: Iterable[str] | None) -> Iterator[None]:
    """Restrict host addresses inside the block and restore the previous setting.

    Nested uses restore in reverse order; use it where the restriction must not
    outlive its owner (a service's lifespan, a test).
    """
    previous = _restriction
    restrict_host_addresses(addresses)
    try:
        yield
    finally:
        restrict_host_addresses(previous)


def set_consent_freshness(
    interval: float = DEFAULT_CONSENT_INTERVAL,
    failures: int = DEFAULT_CONSENT_FAILURES,
) -> None:
    """Set how often ICE consent is checked and how many failures end a connection.

    A vanished peer is noticed after about ``failures * (interval + 0.5)`` seconds
    (each check waits 0.5 s for its answer). ``interval=1.0, failures=4`` gives
    about 6 s for one extra STUN request per second per connection, and survives
    three lost checks in a row. Process-wide (see the module docstring); applies
    to the next check of every connection.

    Raises:
        ValueError: ``interval <= 0`` or ``failures < 1``.
    """
    if interval <= 0 or failures < 1:
        raise ValueError("consent interval must be > 0 and failures >= 1")
    aioice.ice.CONSENT_INTERVAL = interval
    aioice.ice.CONSENT_FAILURES = failures


@contextlib.contextmanager
def consent_freshness(interval: float, failures: int) -> Iterator[None]:
    """Apply :func:`set_consent_freshness` inside the block, then restore."""
    previous = aioice.ice.CONSENT_INTERVAL, aioice.ice.CONSENT_FAILURES
    set_consent_freshness(interval, failures)
    try:
        yield
    finally:
        set_consent_freshness(*previous)


def create_peer_connection(
    ice_servers: Sequence[RTCIceServer] = (),
) -> RTCPeerConnection:
    """Build a peer connection that uses only the given ICE servers.

    Args:
        ice_servers: STUN/TURN servers; none (the default) means host candidates
            only, never aiortc's default public STUN server.
    """
    return RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers)))
