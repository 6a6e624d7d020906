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
  POST   /api/v1/namespaces/{ns}/activations/{id}/migrate    admin; {"to"?} -> 202 (_moving)
  GET    /api/v1/invokers                                    admin
  GET    /api/v1/invokers/{invoker}                          admin: state, load, drain progress
  POST   /api/v1/invokers/{invoker}/drain                    admin; {"grace_s"?} -> 202
  POST   /api/v1/invokers/{invoker}/undrain                  admin
  GET    /api/v1/invokers/{invoker}/metrics|status           admin (the invoker's own pages)
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
from typing import Any

from flask import Flask, Response, g, request
from sqlalchemy import text
from werkzeug.exceptions import HTTPException

from sllm.core.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    SllmError,
    Unavailable,
    error_class,
)
from sllm.core.messages import show_value
from sllm.core.names import is_dns_label
from sllm.db import Function

from . import _cloudevents as ce
from . import _openai as oai
from ._activations import Run
from ._auth import Principal, credentials
from ._functions import check_name
from ._invoker_pages import invoker_page as read_invoker_page
from ._openapi import openapi_document
from ._reconnect import ACTIVATION_ID, Progress, marks, parse_event_id, parse_from
from ._request import (
    body_bytes,
    body_length,
    check_path_names,
    flag,
    json_body,
    page,
    time_arg,
)
from ._service import Controller
from ._streams import StartedEvents, native_events, sse_events, stream_response

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
        g.key = credentials(request.headers.get("Authorization", ""))
        g.principal = controller.authenticate(g.key)
        check_path_names(request.view_args or {})

    @app.after_request
    def count(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        controller.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        if not response.is_streamed:
            controller.metrics.latency.labels(endpoint).observe(time.perf_counter() - g.started)
        return response

    @app.errorhandler(SllmError)
    def sllm_error(exc: SllmError) -> Response:
        body = oai.error_body(exc) if _openai_path() else exc.to_json()
        return _error(body, exc.status, exc.retry_after)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        body: dict[str, Any] = {"error": {"code": code, "message": exc.description or exc.name}}
        if _openai_path():
            body["error"].update(type="invalid_request_error", param=None)
        return _error(body, exc.code or 500)

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception) -> Response:
        # A bug, not a client's fault: its traceback goes to the log, the caller gets the
        # error shape every other failure has (never werkzeug's HTML page).
        log.exception("%s %s failed", request.method, request.path)
        return sllm_error(SllmError("internal error; the controller's log has the details"))

    def _error(body: dict[str, Any], status: int, retry_after: float | None = None) -> Response:
        """An error answer; a trigger's is a CloudEvent when the caller sent one."""
        if request.endpoint not in ("trigger", "host_trigger"):
            return _json(body, status, retry_after)
        trigger = g.get("trigger") or ce.unparsed_trigger(dict(request.headers.items()))
        args = request.view_args or {}
        route = (
            (args["ns"], args["name"])
            if "ns" in args
            else ce.route_from_host(request.host, config.domain)
        )
        source = f"/sllm/{route[0]}/{route[1]}" if route else "/sllm"
        status, headers, data = ce.error_reply(trigger, body, status, source)
        return _retry_after(Response(data, status=status, headers=headers), retry_after)

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
        return _json(controller.create_key(ns, json_body(empty={})), 201)

    @app.delete("/api/v1/namespaces/<ns>/keys/<key_id>")
    def revoke_key(ns: str, key_id: str) -> Response:
        _admin()
        return _json(controller.revoke_key(ns, key_id))

    @app.get("/api/v1/invokers")
    def invokers() -> Response:
        _admin()
        return _json(controller.list_invokers())

    @app.get("/api/v1/invokers/<invoker>")
    def get_invoker(invoker: str) -> Response:
        _admin()
        return _json(controller.get_invoker(invoker))

    @app.post("/api/v1/invokers/<invoker>/drain")
    def drain_invoker(invoker: str) -> Response:
        _admin()
        return _json(controller.drain_invoker(invoker, json_body(empty={})), 202)

    @app.post("/api/v1/invokers/<invoker>/undrain")
    def undrain_invoker(invoker: str) -> Response:
        _admin()
        return _json(controller.undrain_invoker(invoker))

    @app.get("/api/v1/invokers/<invoker>/<page>")
    def invoker_page(invoker: str, page: str) -> Response:
        _admin()
        content_type, body = read_invoker_page(controller, invoker, page)
        return Response(body, content_type=content_type)

    # ------------------------------------------------------------ functions
    @app.get("/api/v1/namespaces/<ns>/functions")
    def list_functions(ns: str) -> Response:
        limit, skip = page(request.args)
        return _json(controller.list_functions(_ns(ns), limit, skip))

    @app.put("/api/v1/namespaces/<ns>/functions/<name>")
    def put_function(ns: str, name: str) -> Response:
        overwrite = flag("overwrite", False)
        doc, created = controller.put_function(_ns(ns), name, json_body(), overwrite=overwrite)
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
        blocking, result_only = flag("blocking", False), flag("result", False)
        stream = flag("stream", False)
        namespace, fn = _function(ns, name)
        if stream and request.headers.get("Last-Event-ID"):  # a reconnect: the body is moot
            return _reconnected_native(namespace, request.headers["Last-Event-ID"], fn.name)
        body = json_body(empty={})
        run = controller.new_run(
            namespace, fn, body, blocking=blocking or stream, body_bytes=body_length()
        )
        if stream:
            if fn.task != "generate":
                raise InvalidRequest(f"only generate functions stream; {name!r} is {fn.task}")
            run.stream = True
            try:
                events = StartedEvents(controller.execute(run, fn))
            except SllmError as exc:  # before the first event: answered as a blocking call is
                doc = {**exc.to_json(), "activationId": run.id}
                return _json(doc, exc.status, exc.retry_after, {"X-Activation-Id": run.id})
            return stream_response(events, native_events(events, run), "application/x-ndjson", run)
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
                since=time_arg("since"),
                upto=time_arg("upto"),
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

    @app.get("/api/v1/namespaces/<ns>/activations/<activation_id>/stream")
    def activation_stream(ns: str, activation_id: str) -> Response:
        namespace = _ns(ns)
        if not ACTIVATION_ID.fullmatch(activation_id):
            raise InvalidRequest(f"{activation_id!r} is not an activation id (32 hex digits)")
        given = request.headers.get("Last-Event-ID")
        if request.args.get("from") is not None:
            have = parse_from(request.args["from"])
        elif given:
            named, have = parse_event_id(given)
            if named != activation_id:
                raise InvalidRequest(
                    f"Last-Event-ID names activation {named}, not {activation_id}",
                    param="Last-Event-ID",
                )
        else:
            have = {0: 0}
        return _reconnected_native(namespace, f"{activation_id}:{marks(have)}", None)

    def _reconnected_native(namespace: str, event_id: str, function: str | None) -> Response:
        activation_id, have = parse_event_id(event_id)
        run, events = controller.reattach(namespace, activation_id, have)
        if function is not None and run.function != function:
            events.close()
            raise Conflict(
                f"activation {activation_id} is one of function {run.function!r}, not {function!r}",
                param="Last-Event-ID",
            )
        started = StartedEvents(events)
        progress = Progress(run.id, have)
        return stream_response(
            started, native_events(started, run, progress), "application/x-ndjson", run
        )

    @app.post("/api/v1/namespaces/<ns>/activations/<activation_id>/cancel")
    def cancel_activation(ns: str, activation_id: str) -> Response:
        namespace = _ns(ns)
        if not ACTIVATION_ID.fullmatch(activation_id):
            raise InvalidRequest(f"{activation_id!r} is not an activation id (32 hex digits)")
        return _json(controller.cancel(namespace, activation_id))

    @app.post("/api/v1/namespaces/<ns>/activations/<activation_id>/migrate")
    def migrate_activation(ns: str, activation_id: str) -> Response:
        _admin()
        return _json(controller.migrate(_ns(ns), activation_id, json_body(empty={})), 202)

    @app.get("/api/v1/namespaces/<ns>/activations/<activation_id>/logs")
    def activation_logs(ns: str, activation_id: str) -> Response:
        doc = controller.get_activation(_ns(ns), activation_id)
        return _json({"activationId": activation_id, "logs": doc["logs"]})

    # ------------------------------------------------------------ internal
    @app.post("/internal/v1/invokers/heartbeat")
    def heartbeat() -> Response:
        return _json(controller.heartbeat(json_body()))

    # ------------------------------------------------------------ OpenAI-compatible
    @app.get("/v1/models")
    def models() -> Response:
        ns = _ns("_")
        rows = controller.list_functions(ns, 200, 0)
        return _json(oai.models_response([(f["name"], f["created"], ns) for f in rows]))

    @app.get("/v1/models/<name>")
    def model(name: str) -> Response:
        ns = _ns("_")
        f = controller.get_function(ns, name)
        return _json(oai.model_response(f["name"], f["created"], ns))

    @app.post("/v1/completions")
    def completions() -> Response:
        return _openai_generate(oai.parse_completion(json_body()))

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        return _openai_generate(oai.parse_chat(json_body()))

    @app.post("/v1/embeddings")
    def embeddings() -> Response:
        req = oai.parse_embedding(json_body())
        ns, fn = _function("_", req.function)
        if fn.task != "embed":
            raise InvalidRequest(f"function {fn.name!r} generates text; it has no embeddings")
        run = controller.new_run(ns, fn, req.params, blocking=True, body_bytes=body_length())
        run, _ = controller.invoke(run, fn)
        _raise_if_failed(run)
        assert run.result is not None
        return _json(oai.embeddings_response(fn.name, run.result, req.encoding_format))

    def _openai_generate(req: oai.OpenAIRequest) -> Response:
        try:
            return _openai_generation(req)
        except SllmError as exc:
            raise req.in_client_terms(exc) from None

    def _openai_generation(req: oai.OpenAIRequest) -> Response:
        ns, fn = _function("_", req.function)
        if fn.task != "generate":
            raise InvalidRequest(f"function {fn.name!r} computes embeddings; it does not generate")
        run = controller.new_run(ns, fn, req.params, blocking=True, body_bytes=body_length())
        created = int(time.time())
        given = request.headers.get("Last-Event-ID")
        if req.stream and given:
            activation_id, have = parse_event_id(given)
            run, events = controller.reattach(ns, activation_id, have)
            if run.function != fn.name:
                events.close()
                raise Conflict(
                    f"activation {activation_id} is one of model {run.function!r}, not {fn.name!r}",
                    param="Last-Event-ID",
                )
        if req.stream:
            run.stream = True
            chunks = oai.CompletionStream(
                req.kind,
                fn.name,
                run.id,
                created,
                include_usage=req.include_usage,
                echo=req.echo,
                logprobs=req.logprobs,
            )
            if given:
                started = StartedEvents(events)
                progress = Progress(run.id, have)
                body = sse_events(started, chunks, progress, reconnected=True)
                return stream_response(started, body, "text/event-stream", run)
            started = StartedEvents(controller.execute(run, fn))
            body = sse_events(started, chunks, Progress(run.id))
            return stream_response(started, body, "text/event-stream", run)
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
                choices=result.get("choices"),
                echo=req.echo,
                logprobs=req.logprobs,
            ),
            headers={"X-Activation-Id": run.id},
        )

    # ------------------------------------------------------------ Knative triggers
    @app.post("/t/<ns>/<name>")
    def trigger(ns: str, name: str) -> Response:
        return _trigger(ns, name)

    @app.post("/")
    def host_trigger() -> Response:
        route = ce.route_from_host(request.host, config.domain)
        if route is None:
            raise InvalidRequest(
                f"POST / routes by Host {{function}}.{{namespace}}.{config.domain}; "
                f"got Host {request.host!r}"
            )
        ns, name = route
        return _trigger(ns, name)

    def _trigger(ns: str, name: str) -> Response:
        req = ce.parse_trigger(dict(request.headers.items()), body_bytes())
        g.trigger = req  # errors from here on answer the event it carries
        namespace, fn = _function(ns, name)
        run = controller.new_run(
            namespace, fn, req.payload, blocking=True, body_bytes=body_length()
        )
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
        return _retry_after(response, run.retry_after)

    # A principal is cached per process by its key; it names its namespace by id.
    # After its namespace was deleted and made anew under the same name, a cached
    # principal (or function) still carries the old id: the name alone must not let
    # the deleted namespace's key into the new one.
    def _ns(requested: str) -> str:
        """The namespace a request names, if the key may use it (by id, for namespace keys)."""
        p = _principal()
        namespace = p.namespace_for(requested)
        if _bound(p) and controller.namespace_id(namespace) != p.namespace_id:
            namespace = _fresh_principal().namespace_for(requested)
        return namespace

    def _function(requested: str, name: str) -> tuple[str, Function]:
        """The namespace and function an invocation names, if the key may use them."""
        p = _principal()
        namespace = p.namespace_for(requested)
        if not is_dns_label(name):  # an OpenAI `model`, say: no function has such a name
            raise NotFound(f"no function {show_value(name)} in namespace {namespace!r}")
        fn = controller.function_for(namespace, name)
        if not _bound(p) or fn.namespace_id == p.namespace_id:
            return namespace, fn
        # The key or the function was cached before the namespace was made anew.
        p = _fresh_principal()
        namespace = p.namespace_for(requested)
        fn = controller.function_for(namespace, name, fresh=True)
        if _bound(p) and fn.namespace_id != p.namespace_id:
            raise NotFound(f"no function {name!r} in namespace {namespace!r}")
        return namespace, fn

    def _fresh_principal() -> Principal:
        """The request's principal read again from the database (401 if its key is gone)."""
        g.principal = controller.authenticate(g.key, fresh=True)
        return _principal()

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


def _bound(p: Principal) -> bool:
    """Whether `p` may use its own namespace only (a namespace key, not an admin)."""
    return not p.admin and p.namespace_id is not None


def _openai_path() -> bool:
    return request.path.startswith("/v1/")


def _raise_if_failed(run: Run) -> None:
    if run.status == "success":
        return
    exc = SllmError.from_json(run.error, run.status)
    exc.retry_after = run.retry_after
    raise exc


def _json(
    doc: Any,
    status: int = 200,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    response = Response(json.dumps(doc), status=status, mimetype="application/json")
    for k, v in (headers or {}).items():
        response.headers[k] = v
    return _retry_after(response, retry_after)


def _retry_after(response: Response, seconds: float | None) -> Response:
    if seconds is not None:
        response.headers["Retry-After"] = str(max(1, round(seconds)))
    return response
