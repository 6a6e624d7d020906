"""The controller's HTTP surface (Flask): native API, OpenAI-compatible, Knative triggers.

Native (OpenWhisk-style), API key (Bearer or Basic):
  GET    /api/v1/namespaces                                  own (admin: all)
  PUT    /api/v1/namespaces/{ns}                             admin
  DELETE /api/v1/namespaces/{ns}                             admin
  GET    /api/v1/namespaces/{ns}/keys            POST ...    admin
  DELETE /api/v1/namespaces/{ns}/keys/{key_id}               admin
  GET    /api/v1/namespaces/{ns}/functions                   ?limit&skip
  PUT    /api/v1/namespaces/{ns}/functions/{fn}              ?overwrite=true updates
  GET    /api/v1/namespaces/{ns}/functions/{fn}   DELETE ...
  POST   /api/v1/namespaces/{ns}/functions/{fn}/invocations  ?blocking&result&stream
  GET    /api/v1/namespaces/{ns}/activations                 ?name&since&upto&status&limit&skip
  GET    /api/v1/namespaces/{ns}/activations/{id}[/result|/logs]
  GET    /api/v1/invokers                                    admin
OpenAI-compatible (the key's namespace): /v1/models, /v1/completions,
  /v1/chat/completions, /v1/embeddings.
Knative-compatible: POST / with Host {fn}.{ns}.{domain}; POST /t/{ns}/{fn}.
Internal (invokers' token): POST /internal/v1/invokers/heartbeat.
Open: /healthz, /readyz, /metrics, /api/v1/openapi.json.
`{ns}` may be `_`: the key's own namespace.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator, Iterator
from typing import Any

from flask import Flask, Response, g, request
from sqlalchemy import text
from werkzeug.exceptions import HTTPException

from sllm.core.errors import Forbidden, InvalidRequest, SllmError, Unavailable, error_class

from . import _cloudevents as ce
from . import _openai as oai
from ._activations import Run
from ._auth import Principal, credentials
from ._functions import check_name
from ._openapi import openapi_document
from ._service import Controller, page

log = logging.getLogger("sllm.controller")

OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/api/v1/openapi.json", "/openapi.json")


def create_app(controller: Controller) -> Flask:
    """The Flask app serving `controller`."""
    app = Flask("sllm.controller")
    app.config["MAX_CONTENT_LENGTH"] = controller.config.max_body_bytes
    config = controller.config

    @app.before_request
    def begin() -> None:
        g.started = time.perf_counter()
        g.principal = None
        if request.path in OPEN_PATHS:
            return
        if request.path.startswith("/internal/"):
            given = request.headers.get("Authorization", "")
            controller.check_internal(given.removeprefix("Bearer ").strip())
            return
        g.principal = controller.authenticate(credentials(request.headers.get("Authorization", "")))

    @app.after_request
    def count(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        controller.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        if not response.is_streamed:
            controller.metrics.latency.labels(endpoint).observe(time.perf_counter() - g.started)
        return response

    @app.errorhandler(SllmError)
    def sllm_error(exc: SllmError) -> Response:
        if _openai_path():
            return _json(oai.error_body(exc), exc.status, exc.retry_after)
        return _json(exc.to_json(), exc.status, exc.retry_after)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        body: dict[str, Any] = {"error": {"code": code, "message": exc.description or exc.name}}
        if _openai_path():
            body["error"].update(type="invalid_request_error", param=None)
        return _json(body, exc.code or 500)

    # ------------------------------------------------------------ open
    @app.get("/healthz")
    def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        try:
            with controller.db.session() as s:
                s.execute(text("SELECT 1"))
        except Exception as exc:
            raise Unavailable(f"database unreachable: {type(exc).__name__}", retry_after=1) from exc
        return _json({"status": "ready"})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(controller.metrics.render(), mimetype="text/plain; version=0.0.4")

    @app.get("/api/v1/openapi.json")
    @app.get("/openapi.json")
    def openapi() -> Response:
        return _json(openapi_document())

    # ------------------------------------------------------------ namespaces and keys
    @app.get("/api/v1/namespaces")
    def namespaces() -> Response:
        p = _principal()
        if p.admin:
            return _json(controller.list_namespaces())
        return _json([n for n in controller.list_namespaces() if n["name"] == p.namespace])

    @app.put("/api/v1/namespaces/<ns>")
    def create_namespace(ns: str) -> Response:
        _admin()
        return _json(controller.create_namespace(ns), 201)

    @app.delete("/api/v1/namespaces/<ns>")
    def delete_namespace(ns: str) -> Response:
        _admin()
        return _json(controller.delete_namespace(ns))

    @app.get("/api/v1/namespaces/<ns>/keys")
    def list_keys(ns: str) -> Response:
        _admin()
        return _json(controller.list_keys(ns))

    @app.post("/api/v1/namespaces/<ns>/keys")
    def create_key(ns: str) -> Response:
        _admin()
        body = request.get_json(silent=True) if request.content_length else {}
        return _json(controller.create_key(ns, body), 201)

    @app.delete("/api/v1/namespaces/<ns>/keys/<key_id>")
    def revoke_key(ns: str, key_id: str) -> Response:
        _admin()
        return _json(controller.revoke_key(ns, key_id))

    @app.get("/api/v1/invokers")
    def invokers() -> Response:
        _admin()
        return _json(controller.list_invokers())

    # ------------------------------------------------------------ functions
    @app.get("/api/v1/namespaces/<ns>/functions")
    def list_functions(ns: str) -> Response:
        limit, skip = page(request.args)
        return _json(controller.list_functions(_ns(ns), limit, skip))

    @app.put("/api/v1/namespaces/<ns>/functions/<name>")
    def put_function(ns: str, name: str) -> Response:
        overwrite = _flag("overwrite", False)
        doc, created = controller.put_function(_ns(ns), name, _body(), overwrite=overwrite)
        return _json(doc, 201 if created else 200)

    @app.get("/api/v1/namespaces/<ns>/functions/<name>")
    def get_function(ns: str, name: str) -> Response:
        return _json(controller.get_function(_ns(ns), name))

    @app.delete("/api/v1/namespaces/<ns>/functions/<name>")
    def delete_function(ns: str, name: str) -> Response:
        return _json(controller.delete_function(_ns(ns), name))

    # ------------------------------------------------------------ invocations
    @app.post("/api/v1/namespaces/<ns>/functions/<name>/invocations")
    def invoke(ns: str, name: str) -> Response:
        namespace = _ns(ns)
        blocking, result_only = _flag("blocking", False), _flag("result", False)
        stream = _flag("stream", False)
        body = _body() if request.content_length else {}
        fn = controller.function_for(namespace, name)
        run = controller.new_run(
            namespace, fn, body, blocking=blocking or stream, body_bytes=_length()
        )
        if stream:
            if fn.task != "generate":
                raise InvalidRequest(f"only generate functions stream; {name!r} is {fn.task}")
            run.stream = True
            return _stream(
                _native_events(controller.execute(run, fn), run), "application/x-ndjson", run
            )
        if not blocking:
            return _json({"activationId": controller.submit(run)}, 202)
        run, finished = controller.invoke(run, fn)
        if not finished:
            return _json({"activationId": run.id}, 202)
        if run.status != "success":
            err = run.error or {"code": "error", "message": run.status}
            status = _status_of(err)
            return _json({"error": err, "activationId": run.id}, status, run.retry_after)
        if result_only:
            return _json(run.result, headers={"X-Activation-Id": run.id})
        return _json(controller.get_activation(namespace, run.id))

    # ------------------------------------------------------------ activations
    @app.get("/api/v1/namespaces/<ns>/activations")
    def list_activations(ns: str) -> Response:
        limit, skip = page(request.args)
        name = request.args.get("name")
        if name is not None:
            check_name(name, "'name'")
        return _json(
            controller.list_activations(
                _ns(ns),
                name=name,
                since=_time_arg("since"),
                upto=_time_arg("upto"),
                status=request.args.get("status"),
                limit=limit,
                skip=skip,
            )
        )

    @app.get("/api/v1/namespaces/<ns>/activations/<activation_id>")
    def get_activation(ns: str, activation_id: str) -> Response:
        return _json(controller.get_activation(_ns(ns), activation_id))

    @app.get("/api/v1/namespaces/<ns>/activations/<activation_id>/result")
    def activation_result(ns: str, activation_id: str) -> Response:
        doc = controller.get_activation(_ns(ns), activation_id)
        return _json(
            {
                "activationId": activation_id,
                "status": doc["status"],
                "success": doc["success"],
                "result": doc["result"],
                "error": doc["error"],
            }
        )

    @app.get("/api/v1/namespaces/<ns>/activations/<activation_id>/logs")
    def activation_logs(ns: str, activation_id: str) -> Response:
        doc = controller.get_activation(_ns(ns), activation_id)
        return _json({"activationId": activation_id, "logs": doc["logs"]})

    # ------------------------------------------------------------ internal
    @app.post("/internal/v1/invokers/heartbeat")
    def heartbeat() -> Response:
        return _json(controller.heartbeat(_body()))

    # ------------------------------------------------------------ OpenAI-compatible
    @app.get("/v1/models")
    def models() -> Response:
        ns = _own_namespace()
        rows = controller.list_functions(ns, 200, 0)
        return _json(oai.models_response([(f["name"], f["created"], ns) for f in rows]))

    @app.get("/v1/models/<name>")
    def model(name: str) -> Response:
        ns = _own_namespace()
        f = controller.get_function(ns, name)
        return _json(oai.model_response(f["name"], f["created"], ns))

    @app.post("/v1/completions")
    def completions() -> Response:
        return _openai_generate(oai.parse_completion(_body()))

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        return _openai_generate(oai.parse_chat(_body()))

    @app.post("/v1/embeddings")
    def embeddings() -> Response:
        req = oai.parse_embedding(_body())
        ns = _own_namespace()
        fn = controller.function_for(ns, req.function)
        if fn.task != "embed":
            raise InvalidRequest(f"function {fn.name!r} generates text; it has no embeddings")
        run = controller.new_run(ns, fn, req.params, blocking=True, body_bytes=_length())
        run, _ = controller.invoke(run, fn)
        _raise_if_failed(run)
        assert run.result is not None
        return _json(oai.embeddings_response(fn.name, run.result, req.encoding_format))

    def _openai_generate(req: oai.OpenAIRequest) -> Response:
        ns = _own_namespace()
        fn = controller.function_for(ns, req.function)
        if fn.task != "generate":
            raise InvalidRequest(f"function {fn.name!r} computes embeddings; it does not generate")
        run = controller.new_run(ns, fn, req.params, blocking=True, body_bytes=_length())
        created = int(time.time())
        if req.stream:
            run.stream = True
            chunks = oai.CompletionStream(
                req.kind, fn.name, run.id, created, include_usage=req.include_usage
            )
            events = controller.execute(run, fn)
            return _stream(_sse(events, chunks), "text/event-stream", run)
        run, _ = controller.invoke(run, fn)
        _raise_if_failed(run)
        result = run.result or {}
        return _json(
            oai.completion_response(
                req.kind,
                fn.name,
                run.id,
                created,
                result.get("text", ""),
                result.get("finish_reason") or "stop",
                result.get("usage") or {},
            ),
            headers={"X-Activation-Id": run.id},
        )

    # ------------------------------------------------------------ Knative triggers
    @app.post("/t/<ns>/<name>")
    def trigger(ns: str, name: str) -> Response:
        return _trigger(_ns(ns), name)

    @app.post("/")
    def host_trigger() -> Response:
        route = ce.route_from_host(request.host, config.domain)
        if route is None:
            raise InvalidRequest(
                f"POST / routes by Host {{function}}.{{namespace}}.{config.domain}; "
                f"got Host {request.host!r}"
            )
        ns, name = route
        return _trigger(_ns(ns), name)

    def _trigger(namespace: str, name: str) -> Response:
        req = ce.parse_trigger(dict(request.headers.items()), request.get_data(cache=False))
        fn = controller.function_for(namespace, name)
        run = controller.new_run(namespace, fn, req.payload, blocking=True, body_bytes=_length())
        run, finished = controller.invoke(run, fn)
        source = f"/sllm/{namespace}/{name}"
        if not finished:
            status, headers, body = ce.reply_headers_and_body(
                req,
                activation_id=run.id,
                source=source,
                result={"activationId": run.id},
                ok=True,
                status=202,
            )
        elif run.status == "success":
            status, headers, body = ce.reply_headers_and_body(
                req, activation_id=run.id, source=source, result=run.result, ok=True
            )
        else:
            err = run.error or {"code": "error", "message": run.status}
            status, headers, body = ce.reply_headers_and_body(
                req,
                activation_id=run.id,
                source=source,
                result={"error": err},
                ok=False,
                status=_status_of(err),
            )
        response = Response(body, status=status, headers=headers)
        response.headers["X-Activation-Id"] = run.id
        _set_retry_after(response, run.retry_after)
        return response

    return app


# --------------------------------------------------------------------------- helpers
def _status_of(error: dict[str, Any]) -> int:
    """The HTTP status of a failed activation: its error class's (502 for codes without one)."""
    cls = error_class(error.get("code"))
    return cls.status if cls is not None else 502


def _principal() -> Principal:
    p = g.principal
    assert isinstance(p, Principal)
    return p


def _admin() -> None:
    if not _principal().admin:
        raise Forbidden("this needs an admin key")


def _ns(requested: str) -> str:
    return _principal().namespace_for(requested)


def _own_namespace() -> str:
    return _principal().namespace_for("_")


def _openai_path() -> bool:
    return request.path.startswith("/v1/")


def _flag(name: str, default: bool) -> bool:
    raw = request.args.get(name)
    if raw is None:
        return default
    value = raw.lower()
    if value in ("true", "1", "yes", ""):
        return True
    if value in ("false", "0", "no"):
        return False
    raise InvalidRequest(f"query argument {name!r} must be true or false, got {raw!r}")


def _time_arg(name: str) -> float | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"{name!r} must be epoch seconds, got {raw!r}") from None
    if not 0 <= value < 1e11:
        raise InvalidRequest(f"{name!r} must be epoch seconds, got {raw!r}")
    return value


def _length() -> int:
    return request.content_length or 0


def _body() -> Any:
    body = request.get_json(silent=True)
    if body is None:
        raise InvalidRequest("the request body must be JSON (Content-Type: application/json)")
    return body


def _raise_if_failed(run: Run) -> None:
    if run.status == "success":
        return
    err = run.error or {"code": "error", "message": run.status}
    raise (error_class(err.get("code")) or SllmError)(
        err.get("message", run.status), retry_after=run.retry_after
    )


def _json(
    doc: Any,
    status: int = 200,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    response = Response(json.dumps(doc), status=status, mimetype="application/json")
    _set_retry_after(response, retry_after)
    for k, v in (headers or {}).items():
        response.headers[k] = v
    return response


def _set_retry_after(response: Response, retry_after: float | None) -> None:
    """Retry-After in whole seconds (at least 1), when the error says when to retry."""
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(retry_after)))


def _stream(chunks: Iterator[bytes], mimetype: str, run: Run) -> Response:
    response = Response(chunks, mimetype=mimetype)
    response.headers["X-Activation-Id"] = run.id
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def _native_events(events: Generator[dict[str, Any], None, None], run: Run) -> Iterator[bytes]:
    """The native stream: NDJSON start / token* / done, or a final error line."""
    try:
        for ev in events:
            kind = ev.get("event")
            if kind == "start":
                out = {
                    "event": "start",
                    "activationId": run.id,
                    "invoker": run.invoker,
                    "load": ev.get("load"),
                }
            elif kind == "token":
                out = {"event": "token", "text": ev.get("text", ""), "index": ev.get("index")}
            elif kind == "done":
                out = {
                    "event": "done",
                    "activationId": run.id,
                    "finish_reason": ev.get("finish_reason"),
                    "usage": ev.get("usage"),
                }
            else:
                continue
            yield (json.dumps(out) + "\n").encode()
    except SllmError as exc:
        yield (
            json.dumps({"event": "error", "activationId": run.id, **exc.to_json()}) + "\n"
        ).encode()
    finally:
        events.close()


def _sse(
    events: Generator[dict[str, Any], None, None], chunks: oai.CompletionStream
) -> Iterator[bytes]:
    """The OpenAI stream: SSE chunks, then [DONE]; an error mid-stream is an error event."""
    try:
        for ev in events:
            for chunk in chunks.feed(ev):
                yield oai.sse(chunk)
        yield oai.SSE_DONE
    except SllmError as exc:
        yield oai.sse_error(exc)
    finally:
        events.close()
