"""Host memory for loads: page-aligned buffers, optionally pinned for CUDA copies."""

from __future__ import annotations

import ctypes
import functools

import torch

from ._engine import HostMemory


@functools.cache
def cuda_available() -> bool:
    """Whether this process can use CUDA (checked once)."""
    return bool(torch.cuda.is_available())


def allocate(nbytes: int, *, pin: bool = False, prefault: bool = False) -> HostMemory:
    """A page-aligned buffer of at least `nbytes`; pinned (page-locked) when `pin`."""
    mem = HostMemory(nbytes)
    if prefault and mem.nbytes:
        # Fault the pages in now so a later read does not pay for it.
        ctypes.memset(mem.address, 0, mem.nbytes)
    if pin:
        pin_memory(mem)
    return mem


def pin_memory(mem: HostMemory) -> None:
    """Page-lock `mem` with cudaHostRegister; it is unregistered when released."""
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(mem.address, mem.nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {mem.nbytes} bytes failed: {err}")
    mem.set_on_release(lambda address: cudart.cudaHostUnregister(address))


def as_tensor(mem: HostMemory, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over the first `nbytes` of `mem` (no copy; keeps `mem` alive).

    torch.frombuffer keeps a reference to the object it is given but releases
    its buffer view at once; handing it a memoryview makes that reference an
    export of `mem` for as long as any tensor views it, which is how the pool
    knows the memory is in use.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(memoryview(mem), dtype=torch.uint8, count=nbytes)
