"""Store URIs: `file:///abs/path` and `s3://bucket[/prefix]`, and the default one.

open_store("file:///var/lib/sllm/store")              -> LocalStore
open_store("s3://models/prod", StoreSettings(...))    -> S3Store (bucket "models", prefix "prod")
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sllm.core.errors import InvalidRequest

from ._base import Store, check_key
from ._local import LocalStore
from ._s3 import S3Store, check_bucket
from ._settings import StoreSettings

_FORMS = "expected file:///absolute/path or s3://bucket[/prefix]"


def open_store(uri: str, settings: StoreSettings | None = None) -> Store:
    """Open the store named by `uri`; InvalidRequest for a malformed URI or missing settings."""
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidRequest(f"store URI is empty; {_FORMS}")
    parts = urlsplit(uri.strip())
    if parts.scheme == "file":
        return LocalStore(_file_path(uri, parts.netloc, parts.path, parts.query, parts.fragment))
    if parts.scheme == "s3":
        bucket, prefix = _s3_location(uri, parts.netloc, parts.path, parts.query, parts.fragment)
        if settings is None or settings.endpoint is None:
            raise InvalidRequest(
                f"store URI {uri!r} needs an S3 endpoint: set SLLM_S3_ENDPOINT "
                "(host:port or http(s)://host:port) and the access keys"
            )
        return S3Store(bucket, prefix, settings)
    if not parts.scheme:
        raise InvalidRequest(f"store URI {uri!r} has no scheme; {_FORMS}")
    raise InvalidRequest(f"store URI {uri!r}: unsupported scheme {parts.scheme!r}; {_FORMS}")


def default_store_uri(env: Mapping[str, str]) -> str:
    """SLLM_STORE_URI if set, else file://$SLLM_HOME/store (SLLM_HOME defaults to ~/.sllm)."""
    uri = env.get("SLLM_STORE_URI", "").strip()
    if uri:
        return uri
    home = env.get("SLLM_HOME", "").strip()
    if home:
        base = Path(home).expanduser()
    else:
        user_home = env.get("HOME", "").strip()
        base = (Path(user_home) if user_home else Path.home()) / ".sllm"
    return Path(os.path.abspath(base / "store")).as_uri()


def _file_path(uri: str, netloc: str, path: str, query: str, fragment: str) -> Path:
    if netloc not in ("", "localhost"):
        raise InvalidRequest(
            f"store URI {uri!r}: file URIs name a local absolute path, as file:///path "
            f"(got host {netloc!r})"
        )
    if query or fragment:
        raise InvalidRequest(f"store URI {uri!r}: file URIs take no query or fragment")
    local = unquote(path)
    if not local.startswith("/") or "\x00" in local:
        raise InvalidRequest(f"store URI {uri!r}: {_FORMS}")
    if ".." in local.split("/"):
        raise InvalidRequest(f"store URI {uri!r}: the path may not contain '..'")
    return Path(local)


def _s3_location(uri: str, netloc: str, path: str, query: str, fragment: str) -> tuple[str, str]:
    if query or fragment or "@" in netloc or ":" in netloc:
        raise InvalidRequest(
            f"store URI {uri!r}: {_FORMS} (the endpoint and keys go in SLLM_S3_* settings)"
        )
    try:
        check_bucket(netloc)
    except InvalidRequest as exc:
        raise InvalidRequest(f"store URI {uri!r}: {exc}") from None
    prefix = unquote(path).strip("/")
    if prefix:
        try:
            check_key(prefix)
        except InvalidRequest as exc:
            raise InvalidRequest(f"store URI {uri!r}: invalid key prefix: {exc}") from None
    return netloc, prefix
