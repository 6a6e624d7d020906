"""The loading-optimized checkpoint format, its converter and the native loader.

convert(src, dst)                    safetensors / HF folder -> checkpoint folder
save_state_dict(state_dict, dst)     in-memory tensors -> checkpoint folder
load(path, device="cpu")             checkpoint folder -> dict[str, Tensor]
load_model(path, device="cpu")       checkpoint folder -> transformers model
build_model(folder, tensors)         config + loaded tensors -> transformers model
HostPool(capacity)                   host-memory tier that keeps loaded checkpoints
"""

from ._convert import convert, save_state_dict
from ._engine import HostMemory, crc32c
from ._errors import (
    CapacityError,
    ChecksumError,
    ConversionError,
    FormatError,
    LoaderError,
    MissingPartitionError,
    ReadError,
    UnsupportedDtypeError,
)
from ._format import FORMAT_VERSION, Chunk, Manifest, TensorEntry, read_manifest
from ._load import LoadResult, load, load_with_info
from ._model import build_model, load_model
from ._pool import FolderSource, HostCheckpoint, HostPool, HostSource, OnChunk
from ._read import ReadStats

__all__ = [
    "FORMAT_VERSION",
    "CapacityError",
    "ChecksumError",
    "Chunk",
    "ConversionError",
    "FolderSource",
    "FormatError",
    "HostCheckpoint",
    "HostMemory",
    "HostPool",
    "HostSource",
    "LoadResult",
    "LoaderError",
    "Manifest",
    "MissingPartitionError",
    "OnChunk",
    "ReadError",
    "ReadStats",
    "TensorEntry",
    "UnsupportedDtypeError",
    "build_model",
    "convert",
    "crc32c",
    "load",
    "load_model",
    "load_with_info",
    "read_manifest",
    "save_state_dict",
]
