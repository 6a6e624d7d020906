"""`StoreSettings`: how to reach an S3-compatible object store, from the environment or code.

SLLM_S3_ENDPOINT    host:port or http(s)://host[:port]      (required for s3:// URIs)
SLLM_S3_ACCESS_KEY  access key id                           (with SLLM_S3_SECRET_KEY)
SLLM_S3_SECRET_KEY  secret access key
SLLM_S3_SECURE      true/false; default: https:// endpoints and non-loopback hosts
SLLM_S3_REGION      region name, e.g. us-east-1             (optional)
SLLM_S3_PART_SIZE_MB  multipart upload part size, 5..5120   (default 64)
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from sllm.core.errors import InvalidRequest

MIB = 1024 * 1024
MIN_PART_SIZE = 5 * MIB  # the S3 minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MIB
DEFAULT_PART_SIZE = 64 * MIB
_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class StoreSettings:
    """Endpoint, credentials and transfer options for S3-compatible stores."""

    endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    secure: bool = False
    region: str | None = None
    part_size: int = DEFAULT_PART_SIZE

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StoreSettings:
        """Read the SLLM_S3_* variables from `env` (validated: InvalidRequest names the bad one)."""
        endpoint = _get(env, "SLLM_S3_ENDPOINT")
        secure_text = _get(env, "SLLM_S3_SECURE")
        if secure_text is None:
            secure = default_secure(endpoint)
        elif secure_text.lower() in _TRUE:
            secure = True
        elif secure_text.lower() in _FALSE:
            secure = False
        else:
            raise InvalidRequest(f"SLLM_S3_SECURE={secure_text!r}: expected true or false")
        part_text = _get(env, "SLLM_S3_PART_SIZE_MB")
        part_size = DEFAULT_PART_SIZE
        if part_text is not None:
            try:
                part_size = int(part_text) * MIB
            except ValueError:
                raise InvalidRequest(
                    f"SLLM_S3_PART_SIZE_MB={part_text!r}: expected a whole number of MiB"
                ) from None
        settings = cls(
            endpoint=endpoint,
            access_key=_get(env, "SLLM_S3_ACCESS_KEY"),
            secret_key=_get(env, "SLLM_S3_SECRET_KEY"),
            secure=secure,
            region=_get(env, "SLLM_S3_REGION"),
            part_size=part_size,
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise InvalidRequest naming the first bad setting and what is allowed."""
        if self.endpoint is not None:
            scheme, _host, _port = parse_endpoint(self.endpoint)
            if scheme == "http" and self.secure:
                raise InvalidRequest(
                    f"SLLM_S3_SECURE=true contradicts SLLM_S3_ENDPOINT={self.endpoint!r} "
                    "(http://); use https:// or set SLLM_S3_SECURE=false"
                )
            if scheme == "https" and not self.secure:
                raise InvalidRequest(
                    f"SLLM_S3_SECURE=false contradicts SLLM_S3_ENDPOINT={self.endpoint!r} "
                    "(https://); use http:// or set SLLM_S3_SECURE=true"
                )
        if (self.access_key is None) != (self.secret_key is None):
            missing = "SLLM_S3_SECRET_KEY" if self.secret_key is None else "SLLM_S3_ACCESS_KEY"
            raise InvalidRequest(
                f"{missing} is not set: SLLM_S3_ACCESS_KEY and SLLM_S3_SECRET_KEY go together"
            )
        if self.region is not None and not _REGION.fullmatch(self.region):
            raise InvalidRequest(
                f"SLLM_S3_REGION={self.region!r}: expected a region name such as us-east-1"
            )
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            raise InvalidRequest(
                f"SLLM_S3_PART_SIZE_MB={self.part_size / MIB:g}: must be between "
                f"{MIN_PART_SIZE // MIB} and {MAX_PART_SIZE // MIB} MiB (S3 part limits)"
            )

    @property
    def address(self) -> str:
        """host:port as the S3 client wants it (the endpoint without a scheme)."""
        if self.endpoint is None:
            raise InvalidRequest("SLLM_S3_ENDPOINT is not set")
        _scheme, host, port = parse_endpoint(self.endpoint)
        return host if port is None else f"{host}:{port}"


def parse_endpoint(endpoint: str) -> tuple[str | None, str, int | None]:
    """Split an endpoint into (scheme or None, host, port or None); InvalidRequest if malformed."""
    text = endpoint.strip()
    bad = f"SLLM_S3_ENDPOINT={endpoint!r}: expected host:port or http(s)://host[:port]"
    scheme: str | None = None
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https"):
            raise InvalidRequest(f"{bad} (scheme {parts.scheme!r} is not http or https)")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise InvalidRequest(f"{bad} (no path, query or user part)")
        scheme, text = parts.scheme, parts.netloc
    host, sep, port_text = text.rpartition(":") if not text.endswith("]") else ("", "", "")
    if not sep:
        host, port_text = text, ""
    elif host.count(":") and not host.startswith("["):
        raise InvalidRequest(f"{bad} (write IPv6 addresses as [addr]:port)")
    if not host or not _HOST.fullmatch(host):
        raise InvalidRequest(f"{bad} (invalid host {host!r})")
    port: int | None = None
    if sep:
        if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
            raise InvalidRequest(f"{bad} (port {port_text!r} is not 1..65535)")
        port = int(port_text)
    return scheme, host, port


def default_secure(endpoint: str | None) -> bool:
    """TLS unless the endpoint says http:// or is a loopback address (a local MinIO)."""
    if endpoint is None:
        return False
    scheme, host, _port = parse_endpoint(endpoint)
    if scheme is not None:
        return scheme == "https"
    return not is_loopback(host)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine (localhost, 127.0.0.0/8, ::1)."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None
