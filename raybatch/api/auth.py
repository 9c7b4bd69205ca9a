"""API keys: `rbk_<key id>_<secret>`. The store keeps the key ID, the account and the
SHA-256 of the secret, never the key; the secret's hash is compared in constant time.

The key ID is public (it names the record and appears in `createdBy`); only the secret
authenticates. Keys are never logged: errors name the key ID at most.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Optional

from raybatch.exceptions import Unauthenticated
from raybatch.resources import ApiKeyRecord, check_id, now
from raybatch.store import Store

KEY_FORMAT = re.compile(r"rbk_(k[0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_NO_SUCH_KEY = hashlib.sha256(b"no such key").hexdigest()


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(store: Store, account: str) -> tuple[str, ApiKeyRecord]:
    """A new key for `account`: (the key, shown once; the stored record)."""
    check_id(account, "account ID")
    key_id = f"k{secrets.token_hex(6)}"
    secret = secrets.token_urlsafe(32)
    record = ApiKeyRecord(key_id=key_id, account=account, secret_sha256=_digest(secret), create_time=now())
    store.put_key(record)
    return f"rbk_{key_id}_{secret}", record


def revoke_key(store: Store, key_id: str) -> ApiKeyRecord:
    record = store.get_key(key_id)
    if record is None:
        raise KeyError(key_id)
    record.revoked = True
    store.put_key(record)
    return record


def authenticate(store: Store, authorization: Optional[str]) -> ApiKeyRecord:
    """The key record behind an `Authorization: Bearer ...` header, or Unauthenticated.

    Missing, malformed, unknown, wrong and revoked keys all get the same answer, so the
    reply tells an attacker nothing about which part was wrong.
    """
    refused = Unauthenticated("missing or invalid API key; send 'Authorization: Bearer <key>'")
    scheme, _, key = (authorization or "").partition(" ")
    match = KEY_FORMAT.fullmatch(key.strip()) if scheme.lower() == "bearer" else None
    if match is None:
        raise refused
    key_id, secret = match.groups()
    record = store.get_key(key_id)
    # Compare even when the record is missing, so timing does not reveal which IDs exist.
    matches = hmac.compare_digest(_digest(secret), record.secret_sha256 if record else _NO_SUCH_KEY)
    if record is None or not matches or record.revoked:
        raise refused
    return record
