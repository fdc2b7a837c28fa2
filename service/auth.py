"""API keys: generated once, stored as SHA-256 hashes, checked in constant time, scoped.

A key reads ``sr_<id>_<secret>``: the id (not secret) finds the row, the whole key is
hashed and compared with :func:`hmac.compare_digest`. Keys carry scopes
(``recon:submit``, ``recon:read``, ``admin``) and an owner; a revoked key is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select

from service.db import ApiKey, JobStore, now

SCOPES = ("recon:submit", "recon:read", "admin")


@dataclass(frozen=True)
class Principal:
    key_id: str
    owner: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: JobStore, scopes: list[str], owner: str) -> tuple[str, str]:
    """A new key: returns (id, key). The key itself is shown once and never stored."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {bad}")
    if not owner or len(owner) > 128:
        raise ValueError("owner must be 1-128 characters")
    key_id = secrets.token_hex(6)
    key = f"sr_{key_id}_{secrets.token_urlsafe(32)}"
    with store.session() as s:
        s.add(ApiKey(id=key_id, owner=owner, scopes=",".join(sorted(set(scopes))), hash=_hash(key)))
    return key_id, key


def _is_key_id(key_id: str) -> bool:
    """Key ids are hex (``create_key``): anything else (a NUL byte, which PostgreSQL text
    cannot hold) is unknown without a query."""
    return 0 < len(key_id) <= 16 and all(c in "0123456789abcdef" for c in key_id)


def authenticate(store: JobStore, key: str) -> Principal | None:
    """The principal a key stands for, or None (unknown, malformed or revoked)."""
    parts = key.split("_")
    if len(parts) < 3 or parts[0] != "sr" or not _is_key_id(parts[1]):
        return None
    with store.sessions() as s:
        row = s.get(ApiKey, parts[1])
    candidate = row.hash if row is not None else _hash("dummy")  # same work either way
    if not hmac.compare_digest(candidate, _hash(key)) or row is None or row.revoked_at:
        return None
    return Principal(row.id, row.owner, frozenset(row.scopes.split(",")))


def revoke_key(store: JobStore, key_id: str) -> bool:
    if not _is_key_id(key_id):
        return False
    with store.session() as s:
        row = s.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = now()
    return True


def list_keys(store: JobStore) -> list[dict]:
    with store.sessions() as s:
        rows = s.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
    return [
        {
            "id": r.id,
            "owner": r.owner,
            "scopes": r.scopes.split(","),
            "created_at": r.created_at.isoformat(),
            "revoked": r.revoked_at is not None,
        }
        for r in rows
    ]
