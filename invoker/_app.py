"""The invoker's HTTP surface (Flask); every endpoint needs the internal token.

GET  /healthz            liveness
GET  /readyz             200 once start-up (bandwidth probes) finished, else 503
GET  /metrics            Prometheus text format
GET  /v1/status          tiers with sizes, instances, device memory, load queue, bandwidths
POST /v1/load            {function, model, task?, concurrency?, instance?, version?}
                         -> LoadReport plus instance and version
POST /v1/unload          {instance, force?} (or {function} while it has exactly one instance);
                         force: even while requests run on it (they end with an error)
POST /v1/invoke          {function, model, instance?, version?, activation?, n?,
                          prompt|messages|tokens, sampling..., stream?}
                         stream: NDJSON events start / token* / finish per choice / done
                         (or error); see _stream for the event fields
POST /v1/embed           {function, model, input}

GET    /v1/generations             running (and recently ended) generations
GET    /v1/generations/<id>        one generation with its exportable state
POST   /v1/generations/<id>/pause  stop it; its final state (its stream ends "paused")
DELETE /v1/generations/<id>        cancel it (its stream ends "cancelled")
GET    /v1/generations/<id>/events every event of a resumable generation's stream from its
                                    start, then live (a reader attaching, see _feed);
                                    409 when it was not started resumable
POST   /v1/generations             {function, model, instance?, version?, activation?,
                                    choice?, state, stream?, hold?}: resume, streaming like
                                    /v1/invoke (token indexes continue the state's count);
                                    with hold: a migration target, prefilled, not decoding
POST   /v1/generations/<id>/prefill   {tokens, wait?}: a held one's cache holds `tokens`
                                    -> {id, tokens, cached, computed, pending} (202: pending)
POST   /v1/generations/<id>/continue  {state}: a held one loads its final state and decodes
                                    -> {id, tokens, recomputed}
Unknown generation: 404; one that already ended (finished, paused, cancelled): 409; so is
a prefill or continue of one that is not held, and a pause of a held one (see _holds).

Once the invoker drains (SIGTERM, see _drain), load, invoke, resume and embed
answer 503 `draining` with Retry-After; everything else keeps answering.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Generator, Iterator
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from sllm.core import strict_json
from sllm.core.errors import Conflict, InvalidRequest, SllmError, Unauthorized
from sllm.core.messages import require_object

from ._service import Invoker
from ._stream import collect

log = logging.getLogger("sllm.invoker")

WORK = frozenset({"load", "invoke", "resume", "embed"})  # endpoints a drain refuses


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

    @app.before_request
    def admit() -> None:
        if request.endpoint in WORK:
            invoker.drain.admit()  # Draining (503) once the drain began
            g.admitted = True

    @app.teardown_request
    def leave(_exc: BaseException | None) -> None:
        # When the view returned: a generation it started is registered by then.
        if g.pop("admitted", False):
            invoker.drain.leave()

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
        body = _body()
        report = invoker.load(body)
        return _json({**report.to_json(), **invoker.loaded_name(body)})

    @app.post("/v1/unload")
    def unload() -> Response:
        body = require_object(_body())
        instance, function = body.get("instance"), body.get("function")
        for name, value in (("instance", instance), ("function", function)):
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequest(f"{name!r} must be a non-empty string", param=name)
        if instance is None and function is None:
            raise InvalidRequest("give 'instance' (or 'function' when it has one instance)")
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise InvalidRequest(f"'force' must be true or false, got {force!r}", param="force")
        if force and instance is None:
            raise InvalidRequest("'force' needs 'instance'", param="force")
        return _json(invoker.unload(function, instance=instance, force=force))

    @app.post("/v1/evict")
    def evict() -> Response:
        return _json(invoker.evict(_body()))

    @app.post("/v1/invoke")
    def invoke() -> Response:
        body = _body()
        stream = _stream_flag(body)
        _, events = invoker.invoke(body)
        return _answer(events, stream)

    @app.get("/v1/generations")
    def generations() -> Response:
        return _json({"generations": invoker.generations.listing()})

    @app.get("/v1/generations/<gen_id>")
    def generation(gen_id: str) -> Response:
        return _json(invoker.generations.get(gen_id).export())

    @app.get("/v1/generations/<gen_id>/events")
    def generation_events(gen_id: str) -> Response:
        entry = invoker.generations.get(gen_id)
        if entry.feed is None:
            raise Conflict(
                f"generation {gen_id!r} was not started resumable (or the invoker runs with "
                "--detach-grace 0): its events are not kept"
            )
        return Response(_ndjson(entry.feed.follow()), mimetype="application/x-ndjson")

    @app.post("/v1/generations/<gen_id>/pause")
    def pause(gen_id: str) -> Response:
        return _json(invoker.generations.pause(gen_id).export())

    @app.delete("/v1/generations/<gen_id>")
    def cancel(gen_id: str) -> Response:
        return _json(invoker.generations.cancel(gen_id).export())

    @app.post("/v1/generations")
    def resume() -> Response:
        body = _body()
        stream = _stream_flag(body)
        _, events = invoker.resume(body)
        return _answer(events, stream)

    @app.post("/v1/generations/<gen_id>/prefill")
    def prefill(gen_id: str) -> Response:
        done, doc = invoker.holds.prefill(gen_id, _body())
        return _json(doc, 200 if done else 202)

    @app.post("/v1/generations/<gen_id>/continue")
    def continue_held(gen_id: str) -> Response:
        return _json(invoker.holds.continue_(gen_id, _body()))

    @app.post("/v1/embed")
    def embed() -> Response:
        return _json(invoker.embed(_body()))

    return app


def _stream_flag(body: Any) -> bool:
    stream = require_object(body).get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest(f"'stream' must be true or false, got {stream!r}", param="stream")
    return stream


def _answer(events: Generator[dict[str, Any], None, None], stream: bool) -> Response:
    if stream:
        return Response(_ndjson(events), mimetype="application/x-ndjson")
    try:
        return _json(collect(events))
    finally:
        events.close()


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
