"""Pure decisions and configuration of the invoker: eviction plans, config parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllm.core.config import parse_size
from sllm.core.errors import InsufficientCapacity
from sllm.invoker import CachedModel, InvokerConfig, plan_eviction

A = CachedModel("a", 4, last_used=1.0, in_use=False)
B = CachedModel("b", 3, last_used=2.0, in_use=True)
C = CachedModel("c", 2, last_used=0.0, in_use=False)


@pytest.mark.parametrize(
    ("entries", "capacity", "need", "victims"),
    [
        ([A, B, C], 10, 1, []),
        ([A, B, C], 10, 2, ["c"]),
        ([A, B, C], 10, 5, ["c", "a"]),
        ([A, C], 6, 6, ["c", "a"]),
        ([], 10, 10, []),
    ],
    ids=["fits", "evict-oldest", "evict-two-lru-order", "evict-all-idle", "empty-exact"],
)
def test_plan_eviction(
    entries: list[CachedModel], capacity: int, need: int, victims: list[str]
) -> None:
    assert plan_eviction(entries, capacity=capacity, need=need) == victims


@pytest.mark.parametrize(
    ("entries", "capacity", "need", "message"),
    [
        ([A, B, C], 10, 11, "do not fit the cache tier at all"),
        ([A, B, C], 10, 8, "held by models in use"),
        ([B], 3, 1, "held by models in use"),
    ],
    ids=["larger-than-tier", "in-use-blocks", "only-busy"],
)
def test_plan_eviction_refuses(
    entries: list[CachedModel], capacity: int, need: int, message: str
) -> None:
    with pytest.raises(InsufficientCapacity, match=message):
        plan_eviction(entries, capacity=capacity, need=need)


@pytest.mark.parametrize(
    ("text", "value"),
    [("512", 512), ("4KiB", 4096), ("1.5GB", 1_500_000_000), ("2 GiB", 2 << 30), ("8M", 8_000_000)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "12 parsecs", "-1", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_config_from_env_and_overrides(tmp_path: Path) -> None:
    env = {
        "SLLM_INTERNAL_TOKEN": "t",
        "SLLM_HOME": str(tmp_path),
        "SLLM_NVME_CAPACITY": "3GiB",
        "SLLM_DRAM_CAPACITY": "512MiB",
        "SLLM_INVOKER_PORT": "9001",
        "SLLM_MEASURE_BANDWIDTH": "off",
        "SLLM_HOLD_TIMEOUT": "30",
    }
    c = InvokerConfig.from_env(env, port=9002, device=None)
    c.validate()
    assert (c.nvme_capacity, c.dram_capacity, c.port) == (3 << 30, 512 << 20, 9002)
    assert c.hold_timeout == 30.0
    assert InvokerConfig.from_env(env, hold_timeout=5.0).hold_timeout == 5.0  # --hold-timeout
    assert c.cache_dir == tmp_path / "invoker"
    assert c.store_uri == f"file://{tmp_path / 'store'}"
    assert c.measure_bandwidth is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLLM_INVOKER_PORT": "http"}, "SLLM_INVOKER_PORT: expected an integer"),
        ({"SLLM_DRAM_CAPACITY": "lots"}, "SLLM_DRAM_CAPACITY"),
        ({"SLLM_MEASURE_BANDWIDTH": "maybe"}, "expected true or false"),
        ({"SLLM_HOLD_TIMEOUT": "2m"}, "SLLM_HOLD_TIMEOUT: expected seconds"),
    ],
    ids=["port", "capacity", "bool", "hold-timeout"],
)
def test_config_rejects_bad_env(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InvokerConfig.from_env({"SLLM_INTERNAL_TOKEN": "t", **env})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"token": ""}, "internal token is empty"),
        ({"port": 70000}, "port must be 0..65535"),
        ({"download_concurrency": 0}, "download_concurrency must be in"),
        ({"part_size": 1000}, "part_size must be in"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N"),
        ({"hold_timeout": 0}, r"hold_timeout must be in \[0.1, 86400\], got 0"),
    ],
    ids=["token", "port", "concurrency", "part-size", "device", "hold-timeout"],
)
def test_config_validate_names_the_bad_value(changes: dict[str, object], message: str) -> None:
    config = InvokerConfig.from_env({"SLLM_INTERNAL_TOKEN": "t"}).replace(**changes)
    with pytest.raises(ValueError, match=message):
        config.validate()
