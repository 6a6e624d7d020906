"""Function definitions: validation of what clients send, and the JSON the API returns.

A function is a model deployment: the model it serves, its task, its limits
(timeout, max tokens, concurrency per instance, payload size), its scaling
policy (min/max instances, target concurrency, keep-alive) and what a stream
does when its invoker is lost mid-generation (`on_invoker_loss`: resume it
elsewhere, the default, or fail). Names are DNS labels, as Knative needs them
for `{fn}.{ns}.{domain}` routing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from sllm.core.errors import InvalidRequest
from sllm.core.messages import TASKS, require_object, show_value
from sllm.core.names import DNS_LABEL_RULE, MODEL_NAME_RULE, is_dns_label, is_model_name
from sllm.core.numbers import is_int, is_number
from sllm.db import Function
from sllm.runtime import SamplingParams

from ._config import FunctionDefaults

MAX_PARAMS_BYTES = 64 * 1024
MAX_INSTANCES = 64
MAX_CONCURRENCY = 256
MIN_TIMEOUT = 0.1  # OpenWhisk's lower limit: less cannot even reach an invoker
MAX_TIMEOUT = 3600.0
MAX_KEEP_ALIVE = 7 * 86400.0
# What an invocation of each task takes (the function's `params` are defaults for these).
INVOCATION_KEYS = {
    "generate": (
        "prompt",
        "messages",
        "tokens",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "seed",
        # issue 11: what vLLM and OpenAI users expect (see runtime/_params.py)
        "n",
        "logprobs",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "ignore_eos",
        "min_tokens",
        "response_format",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
    ),
    "embed": ("input",),
}

_TOP = {"model", "task", "limits", "scaling", "params", "on_invoker_loss"}
# "resume": a generation whose invoker is lost continues on another from the tokens
# relayed; "fail": it ends with invoker_lost (a caller that retries by itself, say).
ON_INVOKER_LOSS = ("resume", "fail")
_LIMITS = {"timeout", "max_tokens", "concurrency", "max_payload"}
_SCALING = {"min_instances", "max_instances", "target_concurrency", "keep_alive"}


def check_name(value: Any, what: str) -> str:
    """`value` as a DNS label (1-63 of a-z 0-9 -, alphanumeric at both ends), else 400."""
    if not is_dns_label(value):
        raise InvalidRequest(f"{what} must be {DNS_LABEL_RULE}; got {show_value(value)}")
    return value


def check_invocation_keys(task: str, params: Mapping[str, Any], where: str = "") -> None:
    """400 naming the keys a `task` invocation does not take (`where`: " in 'params'")."""
    allowed = INVOCATION_KEYS[task]
    unknown = sorted(k for k in params if k not in allowed)
    if unknown:
        raise InvalidRequest(
            f"unknown parameter(s) {unknown}{where} for a {task} function; "
            f"it takes {sorted(allowed)}"
        )


@dataclass(frozen=True)
class FunctionDef:
    """A validated function definition (without its identity and timestamps)."""

    model: str
    task: str = "generate"
    timeout_s: float = 60.0
    max_tokens: int = 512
    concurrency: int = 4
    max_payload_bytes: int = 1024 * 1024
    min_instances: int = 0
    max_instances: int = 1
    target_concurrency: int = 4
    keep_alive_s: float = 300.0
    params: dict[str, Any] = field(default_factory=dict)
    on_invoker_loss: str = "resume"

    @classmethod
    def parse(
        cls,
        body: Any,
        *,
        defaults: FunctionDefaults,
        max_tokens_limit: int,
        max_payload_limit: int,
        base: FunctionDef | None = None,
    ) -> FunctionDef:
        """Validate a create (base None) or update body; fields an update leaves out stay."""
        doc = require_object(body, "function definition")
        unknown = sorted(set(doc) - _TOP)
        if unknown:
            raise InvalidRequest(f"unknown field(s) {unknown}; a function has {sorted(_TOP)}")
        limits = _section(doc, "limits", _LIMITS)
        scaling = _section(doc, "scaling", _SCALING)
        if base is None:
            if "model" not in doc:
                raise InvalidRequest("'model' is required: the published model the function serves")
            base = cls(
                model="",
                timeout_s=defaults.timeout_s,
                max_tokens=defaults.max_tokens,
                concurrency=defaults.concurrency,
                max_payload_bytes=min(defaults.max_payload_bytes, max_payload_limit),
                min_instances=defaults.min_instances,
                max_instances=defaults.max_instances,
                target_concurrency=defaults.concurrency,
                keep_alive_s=defaults.keep_alive_s,
            )
        out = base
        if "model" in doc:
            model = doc["model"]
            if not is_model_name(model):
                raise InvalidRequest(
                    f"'model' must be a published model name, {MODEL_NAME_RULE}; "
                    f"got {show_value(model)}"
                )
            out = replace(out, model=model)
        if "task" in doc:
            if doc["task"] not in TASKS:
                raise InvalidRequest(
                    f"'task' must be one of {list(TASKS)}, got {show_value(doc['task'])}"
                )
            out = replace(out, task=doc["task"])
        if "timeout" in limits:
            out = replace(out, timeout_s=_seconds(limits, "timeout", MIN_TIMEOUT, MAX_TIMEOUT))
        if "max_tokens" in limits:
            out = replace(out, max_tokens=_int(limits, "max_tokens", 1, max_tokens_limit))
        if "concurrency" in limits:
            concurrency = _int(limits, "concurrency", 1, MAX_CONCURRENCY)
            # target concurrency follows the concurrency unless it is set too
            follows = base.target_concurrency == base.concurrency
            out = replace(out, concurrency=concurrency)
            if follows and "target_concurrency" not in scaling:
                out = replace(out, target_concurrency=concurrency)
        if "max_payload" in limits:
            out = replace(out, max_payload_bytes=_int(limits, "max_payload", 1, max_payload_limit))
        if "min_instances" in scaling:
            out = replace(out, min_instances=_int(scaling, "min_instances", 0, MAX_INSTANCES))
        if "max_instances" in scaling:
            out = replace(out, max_instances=_int(scaling, "max_instances", 1, MAX_INSTANCES))
        if "target_concurrency" in scaling:
            out = replace(
                out, target_concurrency=_int(scaling, "target_concurrency", 1, MAX_CONCURRENCY)
            )
        if "keep_alive" in scaling:
            out = replace(out, keep_alive_s=_seconds(scaling, "keep_alive", 0.0, MAX_KEEP_ALIVE))
        if "params" in doc:
            out = replace(out, params=_params(doc["params"]))
        if "on_invoker_loss" in doc:
            value = doc["on_invoker_loss"]
            if value not in ON_INVOKER_LOSS:
                raise InvalidRequest(
                    f"'on_invoker_loss' must be one of {list(ON_INVOKER_LOSS)}, "
                    f"got {show_value(value)}",
                    param="on_invoker_loss",
                )
            out = replace(out, on_invoker_loss=value)
        if out.min_instances > out.max_instances:
            raise InvalidRequest(
                f"'scaling.min_instances' ({out.min_instances}) exceeds "
                f"'scaling.max_instances' ({out.max_instances})"
            )
        if out.target_concurrency > out.concurrency:
            raise InvalidRequest(
                f"'scaling.target_concurrency' ({out.target_concurrency}) exceeds "
                f"'limits.concurrency' ({out.concurrency})"
            )
        _check_defaults(out)
        return out

    @classmethod
    def of(cls, row: Function) -> FunctionDef:
        """The definition stored in a row (its columns are this class's fields)."""
        values = {f.name: getattr(row, f.name) for f in fields(cls)}
        values["params"] = dict(values["params"] or {})
        return cls(**values)

    def columns(self) -> dict[str, Any]:
        """The row's column values."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def function_json(row: Function, namespace: str) -> dict[str, Any]:
    """A function as the API shows it."""
    return {
        "namespace": namespace,
        "name": row.name,
        "model": row.model,
        "task": row.task,
        "limits": {
            "timeout": row.timeout_s,
            "max_tokens": row.max_tokens,
            "concurrency": row.concurrency,
            "max_payload": row.max_payload_bytes,
        },
        "scaling": {
            "min_instances": row.min_instances,
            "max_instances": row.max_instances,
            "target_concurrency": row.target_concurrency,
            "keep_alive": row.keep_alive_s,
        },
        "params": row.params or {},
        "on_invoker_loss": row.on_invoker_loss,
        "version": row.version,
        "created": row.created_at,
        "updated": row.updated_at,
    }


def _section(doc: Mapping[str, Any], name: str, allowed: set[str]) -> Mapping[str, Any]:
    value = doc.get(name)
    if value is None:
        return {}
    section = require_object(value, f"'{name}'")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {unknown} in '{name}'; it has {sorted(allowed)}")
    return section


def _int(doc: Mapping[str, Any], name: str, lo: int, hi: int) -> int:
    value = doc[name]
    if not is_int(value) or not lo <= value <= hi:
        raise InvalidRequest(
            f"{name!r} must be an integer in [{lo}, {hi}], got {show_value(value)}"
        )
    return value


def _seconds(doc: Mapping[str, Any], name: str, lo: float, hi: float) -> float:
    value = doc[name]
    if not (is_number(value) and lo <= value <= hi):
        raise InvalidRequest(
            f"{name!r} must be seconds in [{lo:g}, {hi:g}]; got {show_value(value)}"
        )
    return float(value)


def _check_defaults(spec: FunctionDef) -> None:
    """`params` as every invocation will see them: keys of the task, sampling values in range.

    Checked against the final definition (task, max_tokens), so an update cannot
    leave defaults that make every later call fail.
    """
    check_invocation_keys(spec.task, spec.params, " in 'params'")
    if spec.task == "generate":
        try:
            SamplingParams.from_request(spec.params, max_tokens_limit=spec.max_tokens)
        except InvalidRequest as exc:
            raise InvalidRequest(
                f"in 'params' (the invocations' defaults): {exc.message}"
            ) from None


def _params(value: Any) -> dict[str, Any]:
    params = dict(require_object(value, "'params'"))
    if len(json.dumps(params)) > MAX_PARAMS_BYTES:
        raise InvalidRequest(f"'params' must be at most {MAX_PARAMS_BYTES} bytes of JSON")
    return params
