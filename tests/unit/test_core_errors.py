"""sllm.core.errors: finding an error's class by its code, as relayed between services."""

from __future__ import annotations

from sllm.controller._invokers import InvokerLost
from sllm.controller._service import TimedOut
from sllm.core.errors import CorruptObject, StoreError, error_class


def test_error_class_finds_every_class_by_its_code() -> None:
    assert error_class("store_unavailable") is StoreError
    assert error_class("corrupt_object") is CorruptObject
    assert error_class("timeout") is TimedOut  # defined outside sllm.core
    assert error_class("invoker_lost") is InvokerLost
    assert error_class("internal") is None  # the base class is not a match
    assert error_class("no-such-code") is None
    assert error_class(None) is None
