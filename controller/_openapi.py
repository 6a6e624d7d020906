"""The OpenAPI 3.1 document of the controller's API (served at /api/v1/openapi.json)."""

from __future__ import annotations

from typing import Any

from ._functions import MAX_KEEP_ALIVE, MAX_TIMEOUT, MIN_TIMEOUT

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "param": {"type": "string", "description": "the one request field at fault"},
            },
        }
    },
}

_LOAD_ERROR = {
    "type": ["object", "null"],
    "readOnly": True,
    "description": "why the function is not warm: its last failed prewarm load, or null; "
    "cleared by a load that succeeds or a new definition",
    "required": ["code", "message", "at", "failures", "retry_at"],
    "properties": {
        "code": {"type": "string"},
        "message": {"type": "string"},
        "at": {"type": "number", "description": "epoch seconds of the last failure"},
        "failures": {"type": "integer", "description": "failed loads in a row"},
        "retry_at": {"type": "number", "description": "epoch seconds of the next try"},
    },
}

_FUNCTION = {
    "type": "object",
    "properties": {
        "namespace": {"type": "string", "readOnly": True},
        "name": {"type": "string", "readOnly": True},
        "version": {"type": "integer", "readOnly": True},
        "created": {"type": "number", "readOnly": True, "description": "epoch seconds"},
        "updated": {"type": "number", "readOnly": True, "description": "epoch seconds"},
        "load_error": _LOAD_ERROR,
        "model": {"type": "string", "description": "published model name"},
        "task": {"type": "string", "enum": ["generate", "embed"]},
        "limits": {
            "type": "object",
            "properties": {
                "timeout": {
                    "type": "number",
                    "minimum": MIN_TIMEOUT,
                    "maximum": MAX_TIMEOUT,
                    "description": "seconds",
                },
                "max_tokens": {"type": "integer"},
                "concurrency": {"type": "integer", "description": "requests per instance"},
                "max_payload": {"type": "integer", "description": "bytes"},
            },
        },
        "scaling": {
            "type": "object",
            "properties": {
                "min_instances": {"type": "integer"},
                "max_instances": {"type": "integer"},
                "target_concurrency": {"type": "integer"},
                "keep_alive": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": MAX_KEEP_ALIVE,
                    "description": "seconds an idle instance stays on the device",
                },
            },
        },
        "params": {
            "type": "object",
            "description": "default invocation parameters: the task's parameters only, "
            "checked like an invocation's",
        },
        "on_invoker_loss": {
            "type": "string",
            "enum": ["resume", "fail"],
            "default": "resume",
            "description": "a generation whose invoker is lost mid-stream: resume it on "
            "another invoker from the tokens relayed, or end it with invoker_lost",
        },
    },
}

_INVOCATION = {
    "type": "object",
    "description": "generate: one of prompt/messages/tokens plus sampling; embed: input",
    "properties": {
        "prompt": {"type": "string"},
        "messages": {"type": "array", "items": {"type": "object"}},
        "tokens": {"type": "array", "items": {"type": "integer"}},
        "max_tokens": {
            "type": "integer",
            "description": "absent: what the context leaves after the prompt, up to the limit",
        },
        "temperature": {"type": "number"},
        "top_p": {"type": "number"},
        "top_k": {"type": "integer"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "seed": {"type": "integer"},
        "input": {
            "description": "texts or token ids, each at most the model's context",
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {"type": "array", "items": {"type": "integer"}},
                {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
            ],
        },
    },
}

NS = {"name": "ns", "in": "path", "required": True, "schema": {"type": "string"}}
FN = {"name": "fn", "in": "path", "required": True, "schema": {"type": "string"}}
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
KEY = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
INVOKER = {"name": "invoker", "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, kind: str, what: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": kind},
        "description": what,
    }


PAGE = [_query("limit", "integer", "page size (1-200)"), _query("skip", "integer", "offset")]


def _op(
    summary: str,
    *,
    params: list[Any] | None = None,
    body: Any = None,
    ok: str = "200",
    answer: Any = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": params or [],
        "responses": {
            ok: {
                "description": "success",
                "content": {"application/json": {"schema": answer or {"type": "object"}}},
            },
            "4XX": {
                "description": "client error",
                "content": {"application/json": {"schema": _ERROR}},
            },
            "5XX": {
                "description": "server error",
                "content": {"application/json": {"schema": _ERROR}},
            },
        },
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def openapi_document() -> dict[str, Any]:
    """The whole API."""
    any_obj = {"type": "object"}
    paths: dict[str, Any] = {
        "/api/v1/namespaces": {"get": _op("List namespaces (own; all for admin)")},
        "/api/v1/namespaces/{ns}": {
            "put": _op("Create a namespace (admin)", params=[NS], ok="201"),
            "delete": _op("Delete a namespace with everything in it (admin)", params=[NS]),
        },
        "/api/v1/namespaces/{ns}/keys": {
            "get": _op("List API keys (admin)", params=[NS]),
            "post": _op(
                "Create an API key; the secret is shown once (admin)", params=[NS], ok="201"
            ),
        },
        "/api/v1/namespaces/{ns}/keys/{key_id}": {
            "delete": _op("Revoke an API key (admin)", params=[NS, KEY]),
        },
        "/api/v1/namespaces/{ns}/functions": {
            "get": _op(
                "List functions",
                params=[NS, *PAGE],
                answer={"type": "array", "items": _FUNCTION},
            ),
        },
        "/api/v1/namespaces/{ns}/functions/{fn}": {
            "put": _op(
                "Create a function (201), or update it with overwrite=true (200)",
                params=[NS, FN, _query("overwrite", "boolean", "update an existing function")],
                body=_FUNCTION,
                answer=_FUNCTION,
            ),
            "get": _op("Get a function", params=[NS, FN], answer=_FUNCTION),
            "delete": _op("Delete a function", params=[NS, FN]),
        },
        "/api/v1/namespaces/{ns}/functions/{fn}/invocations": {
            "post": _op(
                "Invoke: 202 + activationId; blocking=true waits (bounded) for the activation; "
                "result=true returns only the result; stream=true streams NDJSON events",
                params=[
                    NS,
                    FN,
                    _query("blocking", "boolean", "wait for the outcome"),
                    _query("result", "boolean", "only the result"),
                    _query("stream", "boolean", "NDJSON start/token/done events"),
                ],
                body=_INVOCATION,
            )
        },
        "/api/v1/namespaces/{ns}/activations": {
            "get": _op(
                "List activations, newest first",
                params=[
                    NS,
                    _query("name", "string", "function"),
                    _query("since", "number", "epoch seconds"),
                    _query("upto", "number", "epoch seconds"),
                    _query(
                        "status",
                        "string",
                        "queued|running|success|function_error|platform_error|timeout",
                    ),
                    *PAGE,
                ],
            )
        },
        "/api/v1/namespaces/{ns}/activations/{id}": {
            "get": _op("Get an activation", params=[NS, ID])
        },
        "/api/v1/namespaces/{ns}/activations/{id}/result": {
            "get": _op("An activation's result", params=[NS, ID])
        },
        "/api/v1/namespaces/{ns}/activations/{id}/logs": {
            "get": _op("An activation's logs", params=[NS, ID])
        },
        "/api/v1/namespaces/{ns}/activations/{id}/stream": {
            "get": _op(
                "Reconnect to a streaming generation: NDJSON events from token `from` on (or "
                "after the Last-Event-ID header's event), from any controller replica",
                params=[
                    NS,
                    ID,
                    _query(
                        "from",
                        "string",
                        "the last token index the client has (12; 12.9 per choice)",
                    ),
                ],
            )
        },
        "/api/v1/namespaces/{ns}/activations/{id}/cancel": {
            "post": _op(
                "Stop a running generation now (closing a stream leaves it running a while "
                "for a reconnect); its stream ends with finish reason cancelled",
                params=[NS, ID],
            )
        },
        "/api/v1/namespaces/{ns}/activations/{id}/migrate": {
            "post": _op(
                "Live-migrate a running generation to invoker `to` (default: the best other "
                "one); the activation's `moves` records it (admin; 202)",
                params=[NS, ID],
                body=any_obj,
                ok="202",
            )
        },
        "/api/v1/invokers": {"get": _op("List invokers (admin)")},
        "/api/v1/invokers/{invoker}": {
            "get": _op("One invoker: state, load, drain progress (admin)", params=[INVOKER])
        },
        "/api/v1/invokers/{invoker}/drain": {
            "post": _op(
                "Drain an invoker: no new work, running generations end or move away within "
                "grace_s, then its instances are unloaded (admin; 202)",
                params=[INVOKER],
                body=any_obj,
                ok="202",
            )
        },
        "/api/v1/invokers/{invoker}/undrain": {
            "post": _op("Put a drained invoker back into placement (admin)", params=[INVOKER])
        },
        "/api/v1/invokers/{invoker}/metrics": {
            "get": _op(
                "An invoker's Prometheus metrics, read with the internal token (admin)",
                params=[INVOKER],
            )
        },
        "/api/v1/invokers/{invoker}/status": {
            "get": _op(
                "An invoker's status: tiers, instances, bandwidths (admin)", params=[INVOKER]
            )
        },
        "/v1/models": {"get": _op("OpenAI: list models (the key's functions)")},
        "/v1/models/{fn}": {"get": _op("OpenAI: one model", params=[FN])},
        "/v1/completions": {"post": _op("OpenAI: text completion (stream: SSE)", body=any_obj)},
        "/v1/chat/completions": {
            "post": _op("OpenAI: chat completion (stream: SSE)", body=any_obj)
        },
        "/v1/embeddings": {"post": _op("OpenAI: embeddings", body=any_obj)},
        "/": {
            "post": _op(
                "Knative: invoke by Host {fn}.{ns}.{domain}; JSON or CloudEvent", body=any_obj
            )
        },
        "/t/{ns}/{fn}": {
            "post": _op("Knative: invoke; JSON or CloudEvent", params=[NS, FN], body=any_obj)
        },
        "/internal/v1/invokers/heartbeat": {
            "post": _op("Invoker registration and heartbeat (internal token)", body=any_obj)
        },
        "/healthz": {"get": _op("Liveness")},
        "/readyz": {"get": _op("Readiness (database reachable)")},
        "/metrics": {"get": _op("Prometheus metrics")},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "sllm controller", "version": "1"},
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "KEY_ID:SECRET"},
                "basic": {"type": "http", "scheme": "basic"},
            },
            "schemas": {"Error": _ERROR, "Function": _FUNCTION, "Invocation": _INVOCATION},
        },
        "security": [{"apiKey": []}, {"basic": []}],
        "paths": paths,
    }
