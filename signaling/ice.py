"""ICE servers for a call: STUN/TURN URLs from the settings, short-lived TURN credentials.

TURN credentials follow the TURN REST scheme that coturn implements with
``use-auth-secret`` / ``static-auth-secret``: the username is ``EXPIRY:USER`` (a
Unix time and a user id) and the password is base64(HMAC-SHA1(secret, username)).
coturn recomputes the password from the shared secret and refuses the username
after its expiry, so nothing is stored and the secret never leaves the server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field


def turn_password(secret: str, username: str) -> str:
    """The password coturn expects for ``username`` under ``static-auth-secret``."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def turn_username(user_id: int, expires_at: int) -> str:
    return f"{expires_at}:{user_id}"


@dataclass(frozen=True)
class IceConfig:
    """STUN and TURN servers; with neither, peers use host candidates only (LAN)."""

    stun_urls: tuple[str, ...] = ()
    turn_urls: tuple[str, ...] = ()
    turn_secret: str = field(default="", repr=False)
    turn_ttl: int = 6 * 3600

    @classmethod
    def from_settings(
        cls, *, stun_urls: str, turn_urls: str, turn_secret: str, turn_ttl: float
    ) -> IceConfig:
        if turn_urls.strip() and not turn_secret:
            raise ValueError("TURN URLs are set but the TURN shared secret is not")
        return cls(
            stun_urls=_split(stun_urls),
            turn_urls=_split(turn_urls),
            turn_secret=turn_secret,
            turn_ttl=int(turn_ttl),
        )

    def servers_for(
        self, user_id: int, now: float
    ) -> tuple[list[dict[str, object]], int | None]:
        """``RTCIceServer`` entries for one user, and when their credentials expire."""
        servers: list[dict[str, object]] = []
        if self.stun_urls:
            servers.append({"urls": list(self.stun_urls)})
        expires: int | None = None
        if self.turn_urls and self.turn_secret:
            expires = int(now) + self.turn_ttl
            username = turn_username(user_id, expires)
            servers.append(
                {
                    "urls": list(self.turn_urls),
                    "username": username,
                    "credential": turn_password(self.turn_secret, username),
                }
            )
        return servers, expires


def _split(urls: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in urls.split(",") if u.strip())
