"""Issued API keys: generated here, stored in the policy file as sha256 hashes, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from policies.schema import Policy

KEY_PREFIX = "lg-"


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    user: str
    groups: tuple[str, ...]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    """Maps a presented key to its principal; built once per policy version."""

    def __init__(self, policy: Policy) -> None:
        self._by_hash: dict[str, tuple[bytes, Principal]] = {}
        for entry in policy.keys:
            digest = entry.sha256 if entry.sha256 is not None else hash_key(entry.key or "")
            groups = tuple(policy.users[entry.user].groups)
            self._by_hash[digest] = (bytes.fromhex(digest), Principal(entry.id, entry.user, groups))

    def authenticate(self, presented: str) -> Principal | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found = self._by_hash.get(digest.hex())
        # The dict lookup only sees a hash of the secret; the final compare is constant time anyway.
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]
