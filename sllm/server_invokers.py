"""The embedded server's local invokers: `sllm server start --invokers N` on one machine.

Each gets its own name, port, cache folder, log and share of the tier
budgets, so N of them form a real multi-host cluster on one machine (to watch
draining, migration and failover). The first keeps what one invoker always
had, so a data folder made by an earlier server stays valid:

    invoker  name      port        cache folder        log
    1        local     PORT+1      DATA/invoker        logs/invoker.log
    2        local-2   PORT+2      DATA/invoker-2      logs/invoker-2.log
    k        local-k   PORT+k      DATA/invoker-k      logs/invoker-k.log

(`--invoker-port P` moves the series to P, P+1, ...). The DRAM and NVMe
budgets given are totals, split evenly: `--invokers 2 --dram-capacity 8GiB`
gives each invoker 4 GiB. With one invoker and no budget given, nothing is
passed and the invoker's own default (or SLLM_*_CAPACITY) applies, as before;
with several, that default is the total that is split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sllm.core.config import parse_size

MAX_INVOKERS = 16
MIN_SHARE = 1024**2  # a tier budget below 1 MiB per invoker cannot hold any model


@dataclass(frozen=True)
class LocalInvoker:
    """One local invoker of the embedded server."""

    key: str  # its child and log name: "invoker", "invoker-2", ...
    name: str  # its name at the controller: "local", "local-2", ...
    port: int
    cache_dir: Path
    dram_bytes: int | None  # None: the invoker's own default
    nvme_bytes: int | None

    def to_json(self) -> dict[str, object]:
        """As server.json lists it (with the pid, added by the supervisor)."""
        return {
            "name": self.name,
            "port": self.port,
            "cache_dir": str(self.cache_dir),
            "log": f"logs/{self.key}.log",
        }


def plan(
    data_dir: Path,
    count: int,
    first_port: int,
    *,
    dram: str = "",
    nvme: str = "",
    env: Mapping[str, str] | None = None,
) -> list[LocalInvoker]:
    """The `count` local invokers; ValueError naming the flag for a bad count or budget."""
    if not 1 <= count <= MAX_INVOKERS:
        raise ValueError(f"--invokers must be in [1, {MAX_INVOKERS}], got {count}")
    if not 1 <= first_port <= 65535 - (count - 1):
        raise ValueError(
            f"invoker ports {first_port}..{first_port + count - 1} are not all valid ports"
        )
    shares = {
        "dram": _share("--dram-capacity", dram, "SLLM_DRAM_CAPACITY", count, env or {}),
        "nvme": _share("--nvme-capacity", nvme, "SLLM_NVME_CAPACITY", count, env or {}),
    }
    invokers = []
    for k in range(1, count + 1):
        suffix = "" if k == 1 else f"-{k}"
        invokers.append(
            LocalInvoker(
                key=f"invoker{suffix}",
                name=f"local{suffix}",
                port=first_port + k - 1,
                cache_dir=data_dir / f"invoker{suffix}",
                dram_bytes=shares["dram"],
                nvme_bytes=shares["nvme"],
            )
        )
    return invokers


def _share(flag: str, given: str, var: str, count: int, env: Mapping[str, str]) -> int | None:
    """Each invoker's share of a total budget (None: pass nothing, the invoker decides)."""
    if not given and count == 1:
        return None
    if given:
        total = parse_size(given, name=flag)
    elif var in env:
        total = parse_size(env[var], name=var)
    else:
        from sllm.invoker import InvokerConfig

        default = InvokerConfig()
        total = default.dram_capacity if var == "SLLM_DRAM_CAPACITY" else default.nvme_capacity
    share = total // count
    if share < MIN_SHARE:
        raise ValueError(
            f"{flag} {given or total} split over {count} invokers leaves {share} bytes each; "
            f"give at least {count} MiB"
        )
    return share


def invoker_command(
    inv: LocalInvoker,
    python: str,
    *,
    store: str,
    device: str,
    controller_url: str,
    drain_grace: float | None,
) -> list[str]:
    """The `sllm invoker start` command line of one local invoker."""
    cmd = [
        python, "-m", "sllm", "invoker", "start",
        "--host", "127.0.0.1", "--port", str(inv.port),
        "--cache-dir", str(inv.cache_dir), "--store", store,
        "--device", device, "--controller", controller_url,
        "--name", inv.name, "--no-measure",
    ]  # fmt: skip
    if inv.dram_bytes is not None:
        cmd += ["--dram-capacity", str(inv.dram_bytes)]
    if inv.nvme_bytes is not None:
        cmd += ["--nvme-capacity", str(inv.nvme_bytes)]
    if drain_grace is not None:
        cmd += ["--drain-grace", f"{drain_grace:g}"]
    return cmd
