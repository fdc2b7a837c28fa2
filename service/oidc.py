"""Optional OIDC bearer tokens: JWTs signed by the hospital's identity provider.

Configured by ``SCORERECON_OIDC_ISSUER``, ``SCORERECON_OIDC_AUDIENCE`` and
``SCORERECON_OIDC_JWKS`` (an https URL or a file path of the provider's JSON Web Key Set).
A token is accepted only with a valid signature (RS256/ES256, key chosen by ``kid``), the
configured issuer and audience, and an unexpired ``exp``. The owner is the ``sub`` claim;
scopes come from the space-separated ``scope`` claim, intersected with ours.

Key rotation: the key set is cached for ``cache_s``; a token signed with a key id the cache
does not hold makes the verifier fetch the set again at once, at most once per
``refetch_s``, so tokens of a new key work from its first use while tokens with made-up key
ids cannot make the gateway hammer the identity provider.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import jwt

from service.auth import SCOPES, Principal

ALGORITHMS = ["RS256", "ES256"]
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class OIDCVerifier:
    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks: str,
        cache_s: float = 300.0,
        refetch_s: float = 30.0,
    ):
        parts = urllib.parse.urlsplit(jwks)
        scheme, host = parts.scheme, parts.hostname
        if scheme not in ("", "https") and not (scheme == "http" and host in LOOPBACK):
            # A key set fetched over plain HTTP (or ftp:, file:) could be swapped in transit
            # by anyone on the path, who could then sign tokens we accept.
            raise ValueError(
                f"SCORERECON_OIDC_JWKS must be an https:// URL or a file path, not {jwks!r}"
            )
        self.issuer, self.audience, self.jwks, self.cache_s = issuer, audience, jwks, cache_s
        self.refetch_s = refetch_s
        self._keys: dict | None = None
        self._loaded = 0.0
        self._lock = threading.Lock()
        self.fetches = 0  # how often the key set was read (the rotation test counts them)

    def _key_set(self, unknown_kid: bool = False) -> dict:
        """The cached key set, read again when stale, or when a token named a key id it
        lacks and the last read is older than ``refetch_s``."""
        with self._lock:
            age = time.monotonic() - self._loaded
            if self._keys is None or age > self.cache_s or (unknown_kid and age > self.refetch_s):
                if self.jwks.startswith(("https://", "http://")):
                    # The operator's URL, https (or http on loopback): checked in __init__.
                    url = self.jwks
                    with urllib.request.urlopen(url, timeout=5) as r:  # nosec B310 # https only
                        data = json.load(r)
                else:
                    data = json.loads(Path(self.jwks).read_text())
                self._keys = {k.get("kid"): jwt.PyJWK(k) for k in data["keys"]}
                self._loaded = time.monotonic()
                self.fetches += 1
            return self._keys

    def verify(self, token: str) -> Principal | None:
        """The principal of a valid token, else None (never raises on bad input)."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self._key_set().get(kid)
            if key is None:  # a rotated key, or a made-up id: one rate-limited refetch
                key = self._key_set(unknown_kid=True).get(kid)
            if key is None:
                return None
            claims = jwt.decode(
                token,
                key.key,
                algorithms=ALGORITHMS,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except (jwt.PyJWTError, ValueError, KeyError, OSError):
            return None
        scopes = frozenset(str(claims.get("scope", "")).split()) & set(SCOPES)
        sub = str(claims["sub"])[:128]
        return Principal(f"oidc:{sub[:11]}", sub, scopes)
