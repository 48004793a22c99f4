"""Signed endpoints and secure access: HMAC-SHA256 tokens (the standard `hmac` module) under keys
from `server.signingKeys`.

- A **route token** is bound to one sandbox, one port and an expiry: it makes
  `[/v1]/sandboxes/{id}/signed/{port}/{token}/...` reachable without the API key until then.
- An **access token** is bound to one sandbox: a sandbox created with `secureAccess: true` is
  reached through the server only, with it in the `OpenSandbox-Secure-Access` header.

Every token names the key that signed it, so keys rotate with an overlap: add the new key first in
the list (it signs from then on), keep the old one (it still verifies) with a `retireAt` after the
last token it signed expires; past `retireAt` it verifies nothing.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass

from opensandbox_platform.server.errors import ApiError

log = logging.getLogger("opensandbox.server")

SECURE_ACCESS_HEADER = "OpenSandbox-Secure-Access"
INVALID_SIGNATURE = "SANDBOX::INVALID_SIGNATURE"
SIGNATURE_EXPIRED = "SANDBOX::SIGNATURE_EXPIRED"
SECURE_ACCESS_REQUIRED = "SANDBOX::SECURE_ACCESS_REQUIRED"
KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_ROUTE = re.compile(r"(?P<expires>[0-9]{1,12})\.(?P<kid>[A-Za-z0-9_-]{1,32})\.(?P<mac>[A-Za-z0-9_-]{43})")
_ACCESS = re.compile(r"(?P<kid>[A-Za-z0-9_-]{1,32})\.(?P<mac>[A-Za-z0-9_-]{43})")


@dataclass(frozen=True)
class SigningKey:
    id: str
    secret: bytes
    retire_at: dt.datetime | None = None  # verifies until then, never signs


def _mac(secret: bytes, message: str) -> str:
    digest = hmac.new(secret, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _route_message(sandbox_id: str, port: int, expires: int) -> str:
    return f"opensandbox-route-v1\n{sandbox_id}\n{port}\n{expires}"


def _access_message(sandbox_id: str) -> str:
    return f"opensandbox-secure-access-v1\n{sandbox_id}"


class Signer:
    def __init__(self, keys: list[SigningKey]) -> None:
        if not keys:
            raise ValueError("at least one signing key is needed")
        active = [key for key in keys if key.retire_at is None]
        if not active:
            raise ValueError("every signing key is retired: the first key without retireAt signs")
        self.signing = active[0]
        self.keys = {key.id: key for key in keys}

    @classmethod
    def ephemeral(cls) -> Signer:
        """A random key of this process (no key configured): tokens do not outlive the server."""
        return cls([SigningKey("ephemeral", secrets.token_bytes(32))])

    def route_token(self, sandbox_id: str, port: int, expires: int) -> str:
        key = self.signing
        return f"{expires}.{key.id}.{_mac(key.secret, _route_message(sandbox_id, port, expires))}"

    def access_token(self, sandbox_id: str) -> str:
        key = self.signing
        return f"{key.id}.{_mac(key.secret, _access_message(sandbox_id))}"

    def check_route(self, sandbox_id: str, port: int, token: str, now: dt.datetime) -> None:
        """401 for a token that is malformed or signed otherwise (another sandbox's, another port's,
        an unknown or retired key's), 403 for a genuine one past its expiry."""
        match = _ROUTE.fullmatch(token)
        if match is None:
            raise ApiError(401, INVALID_SIGNATURE, "the signed route's token is malformed")
        expires = int(match["expires"])
        key = self._key(match["kid"], now)
        wanted = _mac(key.secret, _route_message(sandbox_id, port, expires))
        if not hmac.compare_digest(wanted, match["mac"]):
            raise ApiError(401, INVALID_SIGNATURE, "the signature does not match this sandbox and port")
        if expires <= now.timestamp():
            raise ApiError(403, SIGNATURE_EXPIRED, "the signed route has expired")

    def check_access(self, sandbox_id: str, token: str, now: dt.datetime) -> None:
        match = _ACCESS.fullmatch(token)
        if match is None:
            raise ApiError(401, INVALID_SIGNATURE, f"the {SECURE_ACCESS_HEADER} token is malformed")
        key = self._key(match["kid"], now)
        if not hmac.compare_digest(_mac(key.secret, _access_message(sandbox_id)), match["mac"]):
            raise ApiError(401, INVALID_SIGNATURE, f"the {SECURE_ACCESS_HEADER} token is not this sandbox's")

    def _key(self, key_id: str, now: dt.datetime) -> SigningKey:
        key = self.keys.get(key_id)
        if key is None or (key.retire_at is not None and key.retire_at <= now):
            raise ApiError(401, INVALID_SIGNATURE, "the token was signed with a key this server no longer accepts")
        return key


def new_secret() -> str:
    """A fresh secret as `init-config` writes it."""
    return secrets.token_urlsafe(32)
