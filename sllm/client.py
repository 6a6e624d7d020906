"""A client of the controller's HTTP API, and the CLI's saved configuration.

    Client(apihost, api_key)            one method per endpoint; parsed JSON back
    ApiError                            any failed call: status, code, message, activation id
    load_cli_config(env)                SLLM_APIHOST / SLLM_API_KEY, else $SLLM_HOME/cli.json
    save_cli_config(apihost, api_key)   write $SLLM_HOME/cli.json (mode 0600)

Example:

    with Client("http://127.0.0.1:8700", "KEY_ID:SECRET") as api:
        api.put_function("hello", {"model": "llama"})
        print(api.invoke("hello", {"prompt": "Hi"}, result=True)["text"])
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from sllm.core.config import sllm_home

CONFIG_FILE = "cli.json"
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)


class ApiError(Exception):
    """A call that failed: the controller's error, or no answer at all (`status` None)."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int | None = None,
        activation_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.activation_id = activation_id


@dataclass(frozen=True)
class CliConfig:
    """Where the CLI sends requests and with which key (either may be unset)."""

    apihost: str | None
    api_key: str | None
    path: Path  # the config file these came from, or would


def config_path(env: Mapping[str, str]) -> Path:
    """$SLLM_HOME/cli.json."""
    return sllm_home(env) / CONFIG_FILE


def load_cli_config(env: Mapping[str, str] = os.environ) -> CliConfig:
    """SLLM_APIHOST and SLLM_API_KEY win over the config file; ValueError if the file is bad."""
    path = config_path(env)
    saved: dict[str, Any] = {}
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {path}: {exc}; run `sllm login` again") from None
        if not isinstance(saved, dict) or not all(
            isinstance(saved.get(k), (str, type(None))) for k in ("apihost", "api_key")
        ):
            raise ValueError(
                f"{path} must be a JSON object with string 'apihost' and 'api_key'; "
                "run `sllm login` again"
            )
    return CliConfig(
        apihost=env.get("SLLM_APIHOST") or saved.get("apihost"),
        api_key=env.get("SLLM_API_KEY") or saved.get("api_key"),
        path=path,
    )


def save_cli_config(apihost: str, api_key: str, env: Mapping[str, str] = os.environ) -> Path:
    """Write the CLI's config file (readable by its owner only) and return its path."""
    path = config_path(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"apihost": normalize_apihost(apihost), "api_key": api_key}, f, indent=1)
    os.chmod(partial, 0o600)  # O_CREAT's mode does not apply to a leftover file
    os.replace(partial, path)
    return path


def normalize_apihost(apihost: str) -> str:
    """A base URL: `host:port` gets http://, trailing slashes go."""
    host = apihost.strip().rstrip("/")
    return host if "://" in host else f"http://{host}"


class Client:
    """The controller's native API (`/api/v1`), on behalf of one API key.

    `namespace` is the one paths name; `_` is the key's own. Every method
    returns the parsed JSON answer or raises ApiError.
    """

    def __init__(
        self,
        apihost: str,
        api_key: str,
        *,
        namespace: str = "_",
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.apihost = normalize_apihost(apihost)
        self.namespace = namespace
        self._http = httpx.Client(
            base_url=self.apihost,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ functions
    def put_function(
        self, name: str, body: Mapping[str, Any], *, overwrite: bool = False
    ) -> dict[str, Any]:
        """Create a function; with `overwrite`, update it (fields left out keep their values)."""
        params = {"overwrite": "true"} if overwrite else None
        return self._call("PUT", self._fn_path(name), json=dict(body), params=params)

    def get_function(self, name: str) -> dict[str, Any]:
        """One function."""
        return self._call("GET", self._fn_path(name))

    def list_functions(
        self, *, limit: int | None = None, skip: int | None = None
    ) -> list[dict[str, Any]]:
        """A page of functions, by name."""
        path = f"{self._ns_path()}/functions"
        return self._call("GET", path, params=_query(limit=limit, skip=skip))

    def delete_function(self, name: str) -> dict[str, Any]:
        """Delete a function; answers what it was."""
        return self._call("DELETE", self._fn_path(name))

    # ------------------------------------------------------------ invocations
    def invoke(
        self,
        name: str,
        params: Mapping[str, Any],
        *,
        blocking: bool = False,
        result: bool = False,
    ) -> dict[str, Any]:
        """Invoke a function.

        Not blocking: `{"activationId"}`. Blocking: the activation, or only its
        result with `result`; `{"activationId"}` alone when it outlived the
        controller's blocking wait. A failed activation raises ApiError with
        its `activation_id`.
        """
        query = _query(blocking=blocking or result, result=result)
        path = f"{self._fn_path(name)}/invocations"
        return self._call("POST", path, json=dict(params), params=query)

    def invoke_stream(self, name: str, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Invoke and yield the events as they come: start, token..., then done or error."""
        path = f"{self._fn_path(name)}/invocations"
        yield from self._events("POST", path, json=dict(params), params={"stream": "true"})

    def cancel_activation(self, activation_id: str) -> dict[str, Any]:
        """Stop a running generation now: `{"activationId", "cancelled": [...]}`."""
        return self._call("POST", f"{self._activation_path(activation_id)}/cancel")

    def activation_stream(self, activation_id: str, after: str = "0") -> Iterator[dict[str, Any]]:
        """Reconnect to a streaming generation: its events after token `after` (an index,
        or one per choice "12.9"), then its end."""
        path = f"{self._activation_path(activation_id)}/stream"
        yield from self._events("GET", path, params={"from": after})

    # ------------------------------------------------------------ activations
    def list_activations(
        self,
        *,
        name: str | None = None,
        since: float | None = None,
        upto: float | None = None,
        status: str | None = None,
        limit: int | None = None,
        skip: int | None = None,
    ) -> list[dict[str, Any]]:
        """A page of activation summaries, newest first."""
        query = _query(name=name, since=since, upto=upto, status=status, limit=limit, skip=skip)
        return self._call("GET", f"{self._ns_path()}/activations", params=query)

    def get_activation(self, activation_id: str) -> dict[str, Any]:
        """One activation with its request, result, error and logs."""
        return self._call("GET", self._activation_path(activation_id))

    def activation_result(self, activation_id: str) -> dict[str, Any]:
        """`{"activationId", "status", "success", "result", "error"}` of one activation."""
        return self._call("GET", f"{self._activation_path(activation_id)}/result")

    def activation_logs(self, activation_id: str) -> dict[str, Any]:
        """`{"activationId", "logs": [...]}` of one activation."""
        return self._call("GET", f"{self._activation_path(activation_id)}/logs")

    def migrate_activation(self, activation_id: str, to: str | None = None) -> dict[str, Any]:
        """Ask for a live migration of a running generation (admin keys only); `to`: an
        invoker's name, else the controller picks one."""
        body = {} if to is None else {"to": to}
        return self._call("POST", f"{self._activation_path(activation_id)}/migrate", json=body)

    # ------------------------------------------------------------ admin
    def list_invokers(self) -> list[dict[str, Any]]:
        """The invokers the controller knows (admin keys only)."""
        return self._call("GET", "/api/v1/invokers")

    def get_invoker(self, name: str) -> dict[str, Any]:
        """One invoker: state, load, drain progress (admin keys only)."""
        return self._call("GET", f"/api/v1/invokers/{_seg(name)}")

    def drain_invoker(self, name: str, grace_s: float | None = None) -> dict[str, Any]:
        """Start draining an invoker (admin keys only); `grace_s`: the controller's default."""
        body = {} if grace_s is None else {"grace_s": grace_s}
        return self._call("POST", f"/api/v1/invokers/{_seg(name)}/drain", json=body)

    def undrain_invoker(self, name: str) -> dict[str, Any]:
        """Put a drained invoker back into placement (admin keys only)."""
        return self._call("POST", f"/api/v1/invokers/{_seg(name)}/undrain")

    def create_namespace(self, namespace: str) -> dict[str, Any]:
        """A new namespace (admin keys only)."""
        return self._call("PUT", f"/api/v1/namespaces/{_seg(namespace)}")

    def delete_namespace(self, namespace: str) -> dict[str, Any]:
        """Delete a namespace and everything in it (admin keys only)."""
        return self._call("DELETE", f"/api/v1/namespaces/{_seg(namespace)}")

    def create_key(self, namespace: str) -> dict[str, Any]:
        """A new API key for `namespace`: `{"key", "key_id", ...}` (admin keys only)."""
        return self._call("POST", f"/api/v1/namespaces/{_seg(namespace)}/keys")

    # ------------------------------------------------------------ plumbing
    def _ns_path(self) -> str:
        return f"/api/v1/namespaces/{_seg(self.namespace)}"

    def _fn_path(self, name: str) -> str:
        return f"{self._ns_path()}/functions/{_seg(name)}"

    def _activation_path(self, activation_id: str) -> str:
        return f"{self._ns_path()}/activations/{_seg(activation_id)}"

    def _events(self, method: str, path: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """A streamed answer's NDJSON events as they come."""
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if response.is_error:
                    response.read()
                    raise _error_of(response)
                for line in response.iter_lines():
                    if line.strip():
                        yield _parse_event(line)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if response.is_error:
            raise _error_of(response)
        try:
            return response.json()
        except ValueError:
            raise ApiError(
                f"the controller answered {method} {path} with something other than JSON",
                code="bad_response",
                status=response.status_code,
            ) from None

    def _unreachable(self, exc: httpx.HTTPError) -> ApiError:
        what = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
        return ApiError(
            f"the request to the controller at {self.apihost} {what}: {exc or type(exc).__name__}",
            code="unreachable",
        )


def _seg(value: str) -> str:
    """A path segment, escaped so a name can never change the path."""
    return quote(value, safe="")


def _query(**values: Any) -> dict[str, str]:
    out = {}
    for key, value in values.items():
        if value is None or value is False:
            continue
        out[key] = "true" if value is True else str(value)
    return out


def _error_of(response: httpx.Response) -> ApiError:
    try:
        doc = response.json()
    except ValueError:
        doc = None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        activation_id = doc.get("activationId") if isinstance(doc, dict) else None
        return ApiError(
            error["message"],
            code=str(error.get("code") or "error"),
            status=response.status_code,
            activation_id=activation_id if isinstance(activation_id, str) else None,
        )
    text = response.text.strip()[:200] or response.reason_phrase
    return ApiError(
        f"HTTP {response.status_code}: {text}", code="http_error", status=response.status_code
    )


def _parse_event(line: str) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        raise ApiError(
            f"the stream carried a line that is not a JSON object: {line[:80]!r}",
            code="bad_response",
        )
    return event


__all__ = [
    "ApiError",
    "CliConfig",
    "Client",
    "config_path",
    "load_cli_config",
    "normalize_apihost",
    "save_cli_config",
]
