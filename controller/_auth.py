"""API keys: generation, hashing, and resolving a request's credentials to a principal.

A key is `{key_id}:{secret}` (as OpenWhisk's `uuid:key`); the database keeps
the key id and the SHA-256 of the secret, never the secret. Keys are random
(256 bits), so a fast hash is as safe as a slow one. Clients send the key as
`Authorization: Bearer {key}` (what the OpenAI client does) or as HTTP Basic
`key_id:secret` (what `wsk` does).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from sllm.core.errors import Forbidden, Unauthorized
from sllm.core.names import KEY_ID, KEY_ID_RULE
from sllm.db import ApiKey, Namespace


@dataclass(frozen=True)
class Principal:
    """Who is calling: an admin, or a key bound to one namespace."""

    key_id: str
    admin: bool
    namespace: str | None  # None for admin keys
    namespace_id: int | None

    def namespace_for(self, requested: str) -> str:
        """The namespace a path names (`_` = the key's own); 403 when the key may not use it."""
        if requested == "_":
            if self.namespace is None:
                raise Forbidden("an admin key has no namespace of its own: name one instead of '_'")
            return self.namespace
        if self.admin or requested == self.namespace:
            return requested
        raise Forbidden(f"this API key may not use namespace {requested!r}")


def new_key() -> tuple[str, str, str]:
    """A fresh key: (key_id, secret, the full key to hand out once)."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{key_id}:{secret}"


def hash_secret(secret: str) -> str:
    """What the database stores for a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str]:
    """(key_id, secret) of a full key, or Unauthorized."""
    key_id, sep, secret = key.partition(":")
    if not sep or not secret or not KEY_ID.fullmatch(key_id):
        raise Unauthorized(f"malformed API key: expected KEY_ID:SECRET, the KEY_ID {KEY_ID_RULE}")
    return key_id, secret


def credentials(header: str) -> str:
    """The key in an Authorization header (Bearer or Basic), or Unauthorized."""
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            return base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("malformed Basic credentials") from None
    raise Unauthorized("missing API key: send 'Authorization: Bearer KEY_ID:SECRET'")


def authenticate(session: Session, key: str, admin_key: str) -> Principal:
    """The principal a key stands for; Unauthorized for unknown or revoked keys."""
    if admin_key and hmac.compare_digest(key.encode(), admin_key.encode()):
        return Principal("bootstrap", True, None, None)
    key_id, secret = split_key(key)
    row = session.execute(
        select(ApiKey, Namespace.name)
        .outerjoin(Namespace, ApiKey.namespace_id == Namespace.id)
        .where(ApiKey.key_id == key_id)
    ).first()
    if row is None:
        raise Unauthorized("unknown API key")
    api_key, namespace = row
    if not hmac.compare_digest(api_key.secret_hash, hash_secret(secret)):
        raise Unauthorized("unknown API key")
    if api_key.revoked_at is not None:
        raise Unauthorized("this API key was revoked")
    return Principal(api_key.key_id, api_key.admin, namespace, api_key.namespace_id)
