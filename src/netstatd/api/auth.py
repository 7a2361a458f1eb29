"""Who may read: user tokens from a file, browser sessions made from them, and slowing down guessers.

Tokens are compared as SHA-256 digests with hmac.compare_digest against every token, so neither the
length of a match nor which line matched shows in the time taken. A session cookie holds no token:
it is an expiry time and an HMAC, keyed by a secret of this process, over the expiry and the digest
of the token that logged in. Removing a token from the file therefore ends its sessions, and a
restart ends every session.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..tls import file_stamp

log = logging.getLogger("netstatd.api")

SESSION_LIFETIME_S = 12 * 3600
SHORT_TOKEN = 16  # characters; a shorter token is accepted with a warning (it can be guessed)
WS_TOKEN_PROTOCOL = "base64url.bearer.authorization.k8s.io."  # as the Kubernetes API server accepts it


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Token:
    name: str
    digest: bytes


def parse_tokens(text: str, path: str) -> list[Token]:
    """One token per line, optionally `name:token`; blank lines and lines starting with # are skipped."""
    tokens: list[Token] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            name, token = f"line {n}", line
        name, token = name.strip(), token.strip()
        if not token:
            raise ValueError(f"{path} line {n}: a name with no token after ':'")
        if len(token) < SHORT_TOKEN:
            log.warning("%s: token %r is shorter than %d characters and can be guessed", path, name, SHORT_TOKEN)
        tokens.append(Token(name, _digest(token)))
    return tokens


class TokenFile:
    """The tokens of --auth-token-file, read again when the file changes (a Secret update)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reloads = {"ok": 0, "failed": 0}
        self._stamp = file_stamp([path])
        self.tokens = self._read()  # at start-up an unreadable file is fatal (OSError, ValueError)

    def _read(self) -> list[Token]:
        with open(self.path, encoding="utf-8") as f:
            tokens = parse_tokens(f.read(), self.path)
        if not tokens:
            log.warning("%s holds no token: every request that needs one is refused", self.path)
        return tokens

    def reload_if_changed(self) -> bool:
        stamp = file_stamp([self.path])
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.tokens = self._read()
        except (OSError, ValueError) as e:
            self.reloads["failed"] += 1
            log.warning("cannot re-read %s (%s); the previous tokens stay valid", self.path, e)
            return False
        self.reloads["ok"] += 1
        log.info("tokens re-read from %s: %d tokens", self.path, len(self.tokens))
        return True

    def check(self, token: str) -> str | None:
        """The name of the token, or None. Every token is compared, match or not."""
        digest = _digest(token)
        found = None
        for t in self.tokens:
            if hmac.compare_digest(t.digest, digest) and found is None:
                found = t.name
        return found


class Sessions:
    """Stateless session cookies: `EXPIRY.MAC`, MAC = HMAC(process key, EXPIRY, token digest)."""

    def __init__(self, tokens: TokenFile, lifetime_s: int = SESSION_LIFETIME_S) -> None:
        self.tokens = tokens
        self.lifetime_s = lifetime_s
        self._key = secrets.token_bytes(32)

    def _mac(self, expiry: int, digest: bytes) -> str:
        mac = hmac.new(self._key, str(expiry).encode() + b"." + digest, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def issue(self, token: str) -> str:
        expiry = int(time.time()) + self.lifetime_s
        return f"{expiry}.{self._mac(expiry, _digest(token))}"

    def check(self, value: str) -> tuple[str | None, str]:
        """(token name, "") for a valid session, else (None, reason: invalid_session or expired_session)."""
        expiry_text, _, mac = value.partition(".")
        if not expiry_text.isascii() or not expiry_text.isdigit() or len(expiry_text) > 12 or not mac:
            return None, "invalid_session"
        expiry = int(expiry_text)
        found = None
        for t in self.tokens.tokens:
            if hmac.compare_digest(self._mac(expiry, t.digest), mac) and found is None:
                found = t.name
        if found is None:
            return None, "invalid_session"
        if expiry < time.time():
            return None, "expired_session"
        return found, ""


def ws_protocol_token(header: str) -> str | None:
    """The token a browser passes as a WebSocket subprotocol (base64url.bearer.authorization.k8s.io.T,
    T base64url without padding), from a Sec-WebSocket-Protocol header; None if there is none.
    A malformed one is returned as "" (a wrong token, not a missing one)."""
    for proto in header.split(","):
        proto = proto.strip()
        if proto.startswith(WS_TOKEN_PROTOCOL):
            encoded = proto[len(WS_TOKEN_PROTOCOL) :]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return ""
    return None


class FailureThrottle:
    """Slows down a source address that keeps failing: the first FREE failures in WINDOW_S cost
    nothing, each further one doubles a delay (from 0.1 s) up to MAX_DELAY_S. Bounded: the least
    recently failing addresses are forgotten first."""

    FREE = 5
    WINDOW_S = 60.0
    MAX_DELAY_S = 5.0

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._by_address: OrderedDict[str, tuple[float, int]] = OrderedDict()  # first failure, count

    def failed(self, address: str, now: float | None = None) -> float:
        """Record a failure; returns how long to wait before answering it."""
        now = time.monotonic() if now is None else now
        first, count = self._by_address.pop(address, (now, 0))
        if now - first > self.WINDOW_S:
            first, count = now, 0
        count += 1
        self._by_address[address] = (first, count)
        if len(self._by_address) > self.capacity:
            self._by_address.popitem(last=False)
        return 0.0 if count <= self.FREE else min(0.1 * 2 ** (count - self.FREE - 1), self.MAX_DELAY_S)
