"""Rate limiting as pure state: the caller passes the clock."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenBucket:
    """Allow ``rate`` events per second on average, in bursts of up to ``burst``."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    updated: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.tokens = self.burst

    def take(self, now: float) -> bool:
        """Spend one token if there is one; return whether the event is allowed."""
        elapsed = max(0.0, now - self.updated)
        self.updated = now
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until one token is available again."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


@dataclass(slots=True)
class FailureWindow:
    """Count failures per key in a sliding window (login attempts)."""

    limit: int
    window: float
    max_keys: int = 100_000
    _hits: dict[str, list[float]] = field(default_factory=dict)

    def blocked_for(self, key: str, now: float) -> float:
        """Seconds the key must wait, or 0 if it may try now."""
        hits = [t for t in self._hits.get(key, ()) if now - t < self.window]
        if hits:
            self._hits[key] = hits
        else:
            self._hits.pop(key, None)
        if len(hits) < self.limit:
            return 0.0
        return self.window - (now - hits[0])

    def fail(self, key: str, now: float) -> None:
        if len(self._hits) >= self.max_keys:
            # Bounded memory under a spray of distinct keys: forget the oldest.
            self._hits.pop(next(iter(self._hits)))
        self._hits.setdefault(key, []).append(now)

    def clear(self, key: str) -> None:
        self._hits.pop(key, None)
