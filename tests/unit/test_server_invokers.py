"""`sllm server start --invokers N`: names, ports, cache folders and budget shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllm.server_invokers import LocalInvoker, invoker_command, plan

DATA = Path("/data")
GiB = 1024**3


def test_one_invoker_is_what_the_server_always_ran() -> None:
    assert plan(DATA, 1, 8701) == [
        LocalInvoker("invoker", "local", 8701, DATA / "invoker", None, None)
    ]
    # A budget given for one invoker is all of it.
    (only,) = plan(DATA, 1, 8701, dram="8GiB")
    assert (only.dram_bytes, only.nvme_bytes) == (8 * GiB, None)


def test_several_invokers_get_their_own_name_port_folder_and_a_share_of_the_totals() -> None:
    invokers = plan(DATA, 3, 9001, dram="6GiB", nvme="30GiB")
    assert [(i.key, i.name, i.port, i.cache_dir) for i in invokers] == [
        ("invoker", "local", 9001, DATA / "invoker"),
        ("invoker-2", "local-2", 9002, DATA / "invoker-2"),
        ("invoker-3", "local-3", 9003, DATA / "invoker-3"),
    ]
    assert {(i.dram_bytes, i.nvme_bytes) for i in invokers} == {(2 * GiB, 10 * GiB)}


def test_without_budgets_the_default_or_the_variable_is_the_total() -> None:
    default = plan(DATA, 2, 8701)
    assert {(i.dram_bytes, i.nvme_bytes) for i in default} == {(8 * GiB, 32 * GiB)}
    from_env = plan(DATA, 2, 8701, env={"SLLM_DRAM_CAPACITY": "2GiB"})
    assert {i.dram_bytes for i in from_env} == {GiB}


@pytest.mark.parametrize(
    ("count", "port", "budgets", "flag"),
    [
        (0, 8701, {}, "--invokers"),
        (17, 8701, {}, "--invokers"),
        (3, 65534, {}, "ports"),
        (2, 8701, {"dram": "1MiB"}, "--dram-capacity"),
        (2, 8701, {"nvme": "lots"}, "--nvme-capacity"),
    ],
    ids=["none", "too many", "ports past 65535", "share under 1 MiB", "not a size"],
)
def test_bad_counts_and_budgets_name_the_flag(
    count: int, port: int, budgets: dict[str, str], flag: str
) -> None:
    with pytest.raises(ValueError, match=flag):
        plan(DATA, count, port, **budgets)


def test_the_command_passes_the_share_and_the_grace() -> None:
    second = plan(DATA, 2, 8701, dram="2GiB")[1]
    cmd = invoker_command(
        second, "py", store="file:///s", device="cpu", controller_url="http://c", drain_grace=5
    )
    flags = _flags(cmd[5:])
    assert cmd[:5] == ["py", "-m", "sllm", "invoker", "start"]
    assert flags["--name"] == "local-2" and flags["--port"] == "8702"
    assert flags["--cache-dir"] == str(DATA / "invoker-2")
    assert flags["--dram-capacity"] == str(GiB) and flags["--drain-grace"] == "5"
    assert "--nvme-capacity" in flags  # the default total, split
    first = invoker_command(
        plan(DATA, 1, 8701)[0], "py", store="s", device="cpu", controller_url="c", drain_grace=None
    )
    assert not {"--dram-capacity", "--nvme-capacity", "--drain-grace"} & set(first)


def _flags(args: list[str]) -> dict[str, str]:
    """--flag value pairs (a flag without a value maps to "")."""
    flags, i = {}, 0
    while i < len(args):
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        flags[args[i]] = args[i + 1] if has_value else ""
        i += 2 if has_value else 1
    return flags
