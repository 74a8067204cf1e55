"""Catching up after lost broker traffic: one run at a time, coalesced, retried.

A room or a document asks to resynchronise when its broker link comes back (or a
frame from another process could not be used). Requests that arrive while a catch-up
runs fold into one more run after it; a failed run (the database is down) is retried
with capped backoff until it succeeds or its owner closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

log = logging.getLogger(__name__)


class Resync:
    def __init__(
        self,
        label: str,
        catch_up: Callable[[], Awaitable[None]],
        *,
        spawn: Callable[[Callable[[], Awaitable[Any]]], object],
        closed: Callable[[], bool],
    ) -> None:
        self.label = label
        self._catch_up = catch_up
        self._spawn = spawn
        self._closed = closed
        self._state: Literal["idle", "running", "again"] = "idle"

    def request(self) -> bool:
        """Ask for a catch-up; True when this starts a run (False: folded into one)."""
        if self._state != "idle":
            self._state = "again"
            return False
        self._state = "running"
        self._spawn(self._run)
        return True

    async def _run(self) -> None:
        delay = 0.2
        try:
            while not self._closed():
                try:
                    await self._catch_up()
                except Exception as exc:  # noqa: BLE001 - storage down: retry with backoff
                    log.warning(
                        "%s: resync failed (%s); retrying in %.1fs",
                        self.label,
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                if self._state != "again":
                    return
                self._state = "running"
        finally:
            self._state = "idle"
