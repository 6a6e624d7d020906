"""The loading-optimized checkpoint format, its converter and the native loader.

convert(src, dst)                    safetensors / HF folder -> checkpoint folder
save_state_dict(state_dict, dst)     in-memory tensors -> checkpoint folder
load(path, device="cpu")             checkpoint folder -> dict[str, Tensor]
load_model(path, device="cpu")       checkpoint folder -> transformers model
HostPool(capacity)                   host-memory tier that keeps loaded checkpoints
"""

from ._convert import convert, save_state_dict
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
from ._format import FORMAT_VERSION, Manifest, TensorEntry, read_manifest
from ._load import LoadResult, load, load_with_info
from ._model import load_model
from ._pool import HostPool
from ._read import ReadStats

__all__ = [
    "FORMAT_VERSION",
    "CapacityError",
    "ChecksumError",
    "ConversionError",
    "FormatError",
    "HostPool",
    "LoadResult",
    "LoaderError",
    "Manifest",
    "MissingPartitionError",
    "ReadError",
    "ReadStats",
    "TensorEntry",
    "UnsupportedDtypeError",
    "convert",
    "load",
    "load_model",
    "load_with_info",
    "read_manifest",
    "save_state_dict",
]
