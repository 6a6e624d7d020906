"""The dtypes a checkpoint may hold: safetensors names, sizes and torch types."""

from __future__ import annotations

import torch

from ._errors import UnsupportedDtypeError

# name -> (bytes per element, torch attribute name). Names are safetensors'.
_DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E4M3FNUZ": (1, "float8_e4m3fnuz"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E5M2FNUZ": (1, "float8_e5m2fnuz"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "C64": (8, "complex64"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}

SUPPORTED: tuple[str, ...] = tuple(_DTYPES)


def itemsize(name: str) -> int:
    """Bytes per element of dtype `name`; raises UnsupportedDtypeError."""
    try:
        return _DTYPES[name][0]
    except KeyError:
        raise UnsupportedDtypeError(
            f"unsupported dtype {name!r}; supported: {', '.join(SUPPORTED)}"
        ) from None


def to_torch(name: str) -> torch.dtype:
    """The torch dtype for `name`; raises UnsupportedDtypeError if torch lacks it."""
    size = itemsize(name)
    dtype = getattr(torch, _DTYPES[name][1], None)
    if not isinstance(dtype, torch.dtype) or dtype.itemsize != size:
        raise UnsupportedDtypeError(f"dtype {name!r} is not available in torch {torch.__version__}")
    return dtype


def from_torch(dtype: torch.dtype) -> str:
    """The format's name for a torch dtype; raises UnsupportedDtypeError."""
    for name, (_, attr) in _DTYPES.items():
        if getattr(torch, attr, None) == dtype:
            return name
    raise UnsupportedDtypeError(f"torch dtype {dtype} has no checkpoint equivalent")
