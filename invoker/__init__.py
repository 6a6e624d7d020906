"""Invoker: per-host agent with the multi-tier model cache and inference endpoints.

InvokerConfig.from_env(env)     configuration (SLLM_* variables, flags override)
Invoker(config)                 tiers (remote -> NVMe -> DRAM -> device), instances by id,
                                requests, and the registry of running generations
create_app(invoker)             the Flask app (internal-token auth on every endpoint)
serve(config)                   gunicorn: one worker process holding the models, request threads
CacheLock.acquire(folder)       the exclusive claim on a cache folder (CacheFolderBusy if taken)
"""

from ._app import create_app
from ._bandwidth import Bandwidths
from ._cachelock import CacheFolderBusy, CacheLock
from ._config import InvokerConfig
from ._download import RemoteSource, cache_key
from ._eviction import CachedModel, plan_eviction
from ._nvme import NvmeTier
from ._server import serve
from ._service import Invoker
from ._tiers import TierCache, TierLoad

__all__ = [
    "Bandwidths",
    "CacheFolderBusy",
    "CacheLock",
    "CachedModel",
    "Invoker",
    "InvokerConfig",
    "NvmeTier",
    "RemoteSource",
    "TierCache",
    "TierLoad",
    "cache_key",
    "create_app",
    "plan_eviction",
    "serve",
]
