"""Exceptions raised by the checkpoint format, the converter and the loader.

    LoaderError
     ├── FormatError              the folder is not a valid sllm checkpoint
     │    └── UnsupportedDtypeError  a tensor's dtype cannot be represented
     ├── ConversionError          the source (safetensors / HF folder) is unusable
     ├── ReadError                an I/O failure, naming file and offset
     │    └── MissingPartitionError  a partition file is absent
     ├── ChecksumError            a chunk's bytes do not match its checksum
     └── CapacityError            a host memory pool cannot hold the checkpoint

Every error is raised before any tensor is handed out: a failed load never
yields garbage tensors.
"""

from __future__ import annotations


class LoaderError(Exception):
    """Base class of every native_loader error."""


class FormatError(LoaderError, ValueError):
    """The manifest or the folder layout is invalid."""


class UnsupportedDtypeError(FormatError):
    """A tensor uses a dtype this format or this torch build cannot hold."""


class ConversionError(LoaderError, ValueError):
    """The conversion source cannot be read as a checkpoint."""


class ReadError(LoaderError, OSError):
    """Reading a partition failed; `path` and `offset` say where."""

    def __init__(self, message: str, path: str, offset: int, errno_: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.errno_ = errno_

    def __str__(self) -> str:
        return str(self.args[0])


class MissingPartitionError(ReadError):
    """A partition file named by the manifest does not exist."""


class ChecksumError(LoaderError):
    """A chunk's CRC32C differs from the manifest's; names partition and chunk."""

    def __init__(self, message: str, path: str, chunk: int, offset: int) -> None:
        super().__init__(message)
        self.path = path
        self.chunk = chunk
        self.offset = offset


class CapacityError(LoaderError, MemoryError):
    """A host memory pool has no room for the requested checkpoint."""
