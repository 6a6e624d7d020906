"""The invoker's HTTP surface (Flask); every endpoint needs the internal token.

GET  /healthz            liveness
GET  /readyz             200 once start-up (bandwidth probes) finished, else 503
GET  /metrics            Prometheus text format
GET  /v1/status          tiers with sizes, instances, device memory, load queue, bandwidths
POST /v1/load            {function, model, task?, concurrency?} -> LoadReport
POST /v1/unload          {function}
POST /v1/invoke          {function, model, prompt|messages|tokens, sampling..., stream?}
                         stream: NDJSON events start / token* / done (or error)
POST /v1/embed           {function, model, input}
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Generator, Iterator
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from sllm.core import strict_json
from sllm.core.errors import InvalidRequest, SllmError, Unauthorized
from sllm.core.messages import require_object

from ._service import Invoker

log = logging.getLogger("sllm.invoker")


def create_app(invoker: Invoker) -> Flask:
    """The Flask app serving `invoker`."""
    app = Flask("sllm.invoker")
    app.config["MAX_CONTENT_LENGTH"] = invoker.config.max_body_bytes
    expected = f"Bearer {invoker.config.token}".encode()

    @app.before_request
    def authenticate() -> None:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise Unauthorized("missing or wrong internal token (Authorization: Bearer ...)")

    @app.after_request
    def count(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        invoker.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.errorhandler(SllmError)
    def sllm_error(exc: SllmError) -> Response:
        return _error(exc.status, exc.to_json(), exc.retry_after)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        body = {"error": {"code": code, "message": exc.description or exc.name}}
        return _error(exc.code or 500, body)

    @app.get("/healthz")
    def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        if not invoker.ready():
            return _error(503, {"error": {"code": "unavailable", "message": "starting up"}}, 1.0)
        return _json({"status": "ready"})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(invoker.metrics.render(), mimetype="text/plain; version=0.0.4")

    @app.get("/v1/status")
    def status() -> Response:
        return _json(invoker.status())

    @app.post("/v1/load")
    def load() -> Response:
        return _json(invoker.load(_body()).to_json())

    @app.post("/v1/unload")
    def unload() -> Response:
        body = require_object(_body())
        function = body.get("function")
        if not isinstance(function, str) or not function:
            raise InvalidRequest("'function' must be a non-empty string")
        return _json(invoker.unload(function))

    @app.post("/v1/evict")
    def evict() -> Response:
        return _json(invoker.evict(_body()))

    @app.post("/v1/invoke")
    def invoke() -> Response:
        body = _body()
        stream = require_object(body).get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest(f"'stream' must be true or false, got {stream!r}")
        _, events = invoker.invoke(body)
        if stream:
            return Response(_ndjson(events), mimetype="application/x-ndjson")
        return _json(_collect(events))

    @app.post("/v1/embed")
    def embed() -> Response:
        return _json(invoker.embed(_body()))

    return app


def _body() -> Any:
    if not request.is_json:
        raise InvalidRequest("the request body must be JSON (Content-Type: application/json)")
    return strict_json.loads(request.get_data())


def _json(doc: Any, status: int = 200) -> Response:
    return Response(json.dumps(doc), status=status, mimetype="application/json")


def _error(status: int, body: dict[str, Any], retry_after: float | None = None) -> Response:
    response = _json(body, status)
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(retry_after)))
    return response


def _ndjson(events: Generator[dict[str, Any], None, None]) -> Iterator[str]:
    """Events as lines; a failure mid-stream becomes a final error event.

    A client that goes away closes this generator, which closes the
    generation and frees its concurrency slot at once.
    """
    try:
        for ev in events:
            yield json.dumps(ev) + "\n"
    except SllmError as exc:
        yield json.dumps({"event": "error", **exc.to_json()}) + "\n"
    finally:
        events.close()


def _collect(events: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """A whole generation as one JSON document."""
    out: dict[str, Any] = {"text": "", "tokens": []}
    for ev in events:
        if ev["event"] == "start":
            out["load"] = ev["load"]
        elif ev["event"] == "token":
            out["text"] += ev["text"]
            if ev["token"] is not None:
                out["tokens"].append(ev["token"])
        elif ev["event"] == "done":
            out.update(finish_reason=ev["finish_reason"], usage=ev["usage"], timing=ev["timing"])
    return out
