"""API keys and tenants.

Each API key is a tenant. Only a SHA-256 hash of a key is kept (in memory and, as the
agents' ``owner``, in the store); a presented key is hashed and compared with every
configured hash in constant time. Tenants have their own agent id namespace: a tenant's
agent ``support-bot`` is stored as ``<tag>:support-bot`` (``tag`` = the first 12 hex
digits of the key hash), so two tenants never collide and no request can learn whether
another tenant's agent exists. Without keys the server runs in local-only mode: one
tenant that sees every agent in the database under its stored id.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Iterable, Optional

from ..store import MAX_AGENT_ID_CHARS, check_agent_id

#: Environment variable holding API keys, separated by commas or whitespace.
API_KEYS_ENV = "LIFECYCLE_AGENT_API_KEYS"
#: Shortest API key accepted, characters.
MIN_KEY_CHARS = 16
_TAG_HEX = 12
#: Longest agent id over HTTP, characters: the store's limit less a tenant prefix (``<12 hex>:``).
MAX_PUBLIC_ID_CHARS = MAX_AGENT_ID_CHARS - _TAG_HEX - 1


def hash_key(key: str) -> str:
    """The stored form of an API key: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """Who is calling: the owner stored with their agents and the prefix of their agent ids."""

    owner: Optional[str]
    """``sha256:<hex>`` of the key; ``None`` in local-only mode."""
    prefix: str
    """Prepended to public agent ids to form stored ids (``""`` in local-only mode)."""

    @property
    def tag(self) -> str:
        """A short, non-secret name for logs (``local`` in local-only mode)."""
        return self.prefix[:-1] if self.prefix else "local"

    def stored_id(self, public_id: str) -> str:
        """The store's id for this tenant's agent ``public_id`` (validated; ValueError when not allowed)."""
        check_agent_id(public_id)
        limit = MAX_AGENT_ID_CHARS - len(self.prefix)
        if len(public_id) > limit:
            raise ValueError(f"agent id must be at most {limit} characters, got {len(public_id)}")
        return self.prefix + public_id

    def public_id(self, stored_id: Optional[str]) -> Optional[str]:
        """The id this tenant knows a stored agent by."""
        if stored_id is None or not self.prefix:
            return stored_id
        return stored_id[len(self.prefix):] if stored_id.startswith(self.prefix) else None


LOCAL_TENANT = Tenant(owner=None, prefix="")


def parse_keys(text: Optional[str]) -> list[str]:
    """Keys from ``LIFECYCLE_AGENT_API_KEYS``-style text (commas or whitespace between keys)."""
    return [k for k in re.split(r"[\s,]+", text or "") if k]


def keys_from_env() -> list[str]:
    return parse_keys(os.environ.get(API_KEYS_ENV))


class KeyRing:
    """The configured API keys, held only as hashes. Empty: local-only mode."""

    def __init__(self, keys: Iterable[str] = ()):
        hashes: dict[str, Tenant] = {}
        for i, key in enumerate(keys):
            if not isinstance(key, str) or len(key) < MIN_KEY_CHARS or key != key.strip():
                raise ValueError(
                    f"API key #{i + 1} is too short or has surrounding spaces: keys need at least {MIN_KEY_CHARS} "
                    "characters (make one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\")"
                )
            owner = hash_key(key)
            hashes[owner] = Tenant(owner=owner, prefix=owner[len("sha256:"):][:_TAG_HEX] + ":")
        prefixes = [t.prefix for t in hashes.values()]
        if len(set(prefixes)) != len(prefixes):  # 48-bit prefixes of distinct keys: practically never
            raise ValueError("two API keys share a tenant prefix; replace one of them")
        self._tenants = list(hashes.values())
        self._digests = [bytes.fromhex(t.owner[len("sha256:"):]) for t in self._tenants]

    @property
    def local_only(self) -> bool:
        return not self._tenants

    def __len__(self) -> int:
        return len(self._tenants)

    def tenant(self, key: Optional[str]) -> Optional[Tenant]:
        """The tenant of ``key``, or ``None``. Compares against every key hash in constant time."""
        if not key:
            return None
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = None
        for tenant, expected in zip(self._tenants, self._digests):
            if hmac.compare_digest(digest, expected):  # no early exit: time does not depend on which key
                found = tenant
        return found


def is_loopback(host: Optional[str]) -> bool:
    """Whether an address (or ``localhost``) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False
