"""Talking to invokers: one pooled HTTP client per controller process.

Calls carry the internal token. A streamed invocation is read as the
invoker's NDJSON events; a connection that breaks, or an invoker that stops
answering, surfaces as `InvokerLost` so the dispatcher can retry elsewhere
(when nothing was relayed yet) or fail the activation cleanly.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Mapping
from typing import Any

import httpx

from sllm.core.errors import PlatformError, SllmError, Unauthorized, error_class


class InvokerLost(PlatformError):
    """The invoker went away (refused, reset, or silent past the deadline)."""

    status = 503
    code = "invoker_lost"


def error_from(doc: Any, status: int, retry_after: str | None = None) -> SllmError:
    """The SllmError an invoker's error body (or event) stands for."""
    err = doc.get("error") if isinstance(doc, Mapping) else None
    code = err.get("code") if isinstance(err, Mapping) else None
    message = err.get("message") if isinstance(err, Mapping) else None
    cls = error_class(code) or PlatformError
    if cls is Unauthorized:  # the controller's token was refused: that is our fault
        cls = PlatformError
    text = message if isinstance(message, str) else f"invoker answered {status}"
    after = None
    if retry_after:
        try:
            after = float(retry_after)
        except ValueError:
            after = None
    return cls(text, retry_after=after)


class InvokerClient:
    """HTTP calls to invokers, over a keep-alive connection pool."""

    def __init__(self, token: str, *, connect_timeout: float = 2.0) -> None:
        self._headers = {"Authorization": f"Bearer {token}"}
        self._connect = connect_timeout
        self._http = httpx.Client(
            headers=self._headers,
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
            timeout=httpx.Timeout(30.0, connect=connect_timeout),
        )

    def close(self) -> None:
        """Drop the pooled connections."""
        self._http.close()

    def call(self, url: str, path: str, body: Mapping[str, Any], timeout: float) -> Any:
        """POST a JSON body and return the JSON answer; errors become SllmErrors."""
        try:
            response = self._http.post(
                url + path, json=body, timeout=httpx.Timeout(timeout, connect=self._connect)
            )
        except httpx.TimeoutException as exc:
            raise InvokerLost(f"invoker {url} did not answer within {timeout:.0f} s") from exc
        except httpx.TransportError as exc:
            raise InvokerLost(f"invoker {url} is unreachable: {exc}") from exc
        return _answer(response)

    def stream(
        self, url: str, body: Mapping[str, Any], timeout: float
    ) -> Generator[dict[str, Any], None, None]:
        """The invoker's generation events; closing the generator closes the connection.

        An error before the stream starts raises its SllmError; an "error"
        event ends the stream with the SllmError it carries.
        """
        request = self._http.build_request(
            "POST",
            url + "/v1/invoke",
            json={**body, "stream": True},
            timeout=httpx.Timeout(timeout, connect=self._connect),
        )
        try:
            response = self._http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise InvokerLost(f"invoker {url} did not answer within {timeout:.0f} s") from exc
        except httpx.TransportError as exc:
            raise InvokerLost(f"invoker {url} is unreachable: {exc}") from exc
        try:
            if response.status_code != 200:
                response.read()
                _answer(response)
            for line in response.iter_lines():
                if not line:
                    continue
                event = json.loads(line)
                if event.get("event") == "error":
                    raise error_from(event, 502)
                yield event
        except httpx.TimeoutException as exc:
            raise InvokerLost(f"invoker {url} stopped answering mid-stream") from exc
        except (httpx.TransportError, json.JSONDecodeError) as exc:
            raise InvokerLost(f"invoker {url} broke the stream: {exc}") from exc
        finally:
            response.close()


def _answer(response: httpx.Response) -> Any:
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if response.status_code >= 400:
        raise error_from(doc, response.status_code, response.headers.get("Retry-After"))
    return doc
