"""sllm.core.errors: finding an error's class by its code, as relayed between services."""

from __future__ import annotations

from sllm.controller._invokers import InvokerLost
from sllm.controller._service import TimedOut
from sllm.core.errors import (
    ContextLengthExceeded,
    CorruptObject,
    InvalidRequest,
    PlatformError,
    StoreError,
    error_class,
)


def test_error_class_finds_every_class_by_its_code() -> None:
    assert error_class("store_unavailable") is StoreError
    assert error_class("corrupt_object") is CorruptObject
    assert error_class("timeout") is TimedOut  # defined outside sllm.core
    assert error_class("invoker_lost") is InvokerLost
    assert error_class("internal") is None  # the base class is not a match
    assert error_class("no-such-code") is None
    assert error_class(None) is None


def test_an_error_keeps_its_class_and_param_across_a_hop() -> None:
    sent = ContextLengthExceeded("prompt too long", param="messages")
    assert sent.to_json() == {
        "error": {
            "code": "context_length_exceeded",
            "message": "prompt too long",
            "param": "messages",
        }
    }

    got = PlatformError.from_json(sent.to_json()["error"], "no message")

    assert type(got) is ContextLengthExceeded
    assert (got.status, got.message, got.param) == (400, "prompt too long", "messages")


def test_an_error_about_no_one_field_has_no_param() -> None:
    assert InvalidRequest("bad body").to_json() == {
        "error": {"code": "invalid_request", "message": "bad body"}
    }
    got = PlatformError.from_json({"code": "something_new", "param": 3}, "no message")
    assert type(got) is PlatformError and got.param is None and got.message == "no message"
