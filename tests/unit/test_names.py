"""Names are checked as a whole: a trailing newline (which `re.match` with `$` lets through)
is refused by every validator of a name a client or an operator chooses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sllm.controller._functions import check_name
from sllm.core.errors import InvalidRequest
from sllm.core.messages import FunctionSpec
from sllm.core.names import is_dns_label, is_model_name
from sllm.native_loader._format import FormatError, _partition
from sllm.store._published import validate_model_name
from sllm.store._s3 import check_bucket
from sllm.store._settings import StoreSettings, parse_endpoint


def _spec(**fields: Any) -> Callable[[], Any]:
    return lambda: FunctionSpec.from_json({"function": "ns/fn", "model": "m", **fields})


REFUSED: dict[str, Callable[[], Any]] = {
    "function-name": lambda: check_name("fa\n", "function name"),
    "namespace-name": lambda: check_name("nsd\n", "namespace name"),
    "model-name-store": lambda: validate_model_name("nl\n"),
    "model-name-wire": _spec(model="nl\n"),
    "function-id-wire": _spec(function="ns/fn\n"),
    "bucket": lambda: check_bucket("bucket\n"),
    "s3-host": lambda: parse_endpoint("minio\n:9000"),
    "s3-region": lambda: StoreSettings(region="us-east-1\n").validate(),
}


@pytest.mark.parametrize("check", REFUSED.values(), ids=REFUSED.keys())
def test_a_name_ending_in_a_newline_is_refused(check: Callable[[], Any]) -> None:
    with pytest.raises(InvalidRequest):
        check()


@pytest.mark.parametrize("name", ["data.0\n", "data.\u0661"], ids=["newline", "arabic-digit"])
def test_a_partition_file_name_is_data_dot_ascii_digits(name: str) -> None:
    with pytest.raises(FormatError):
        _partition({"file": name, "nbytes": 0, "checksums": []}, 0, 4096)


@pytest.mark.parametrize(
    ("value", "label", "model"),
    [
        ("a", True, True),
        ("a-b", True, True),
        ("Llama-3.1_8B", False, True),
        ("a\n", False, False),
        ("\na", False, False),
        ("a\x00", False, False),
        ("a..b", False, False),
        ("-a", False, False),
        ("a" * 63, True, True),
        ("a" * 64, False, True),
        ("a" * 129, False, False),
        (None, False, False),
    ],
)
def test_name_rules(value: Any, label: bool, model: bool) -> None:
    assert is_dns_label(value) is label
    assert is_model_name(value) is model
