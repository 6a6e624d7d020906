"""Building a transformers model straight from a converted checkpoint.

The model skeleton is built with its parameters on the meta device (no
memory, no random initialisation); buffers that are not saved in
checkpoints (rotary frequencies, position ids) are created for real. The
loaded tensors are then assigned in place of the meta parameters, so the
weights are the loader's buffers: no copy on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import FormatError
from ._load import load
from ._pool import HostPool
from ._read import DEFAULT_THREADS

try:  # transformers 5 validates config fields with huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # older huggingface_hub: plain TypeError / ValueError
    StrictDataclassError = ValueError  # type: ignore[assignment, misc]

_CONFIG_ERRORS = (
    ValueError,
    TypeError,
    ArithmeticError,
    LookupError,
    AttributeError,
    RuntimeError,
    StrictDataclassError,
)

# Building a skeleton patches process-wide functions (Module.register_parameter,
# torch's init functions); two builds interleaving on different threads would
# restore each other's patches, so builds take turns.
_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def skeleton_build() -> Iterator[None]:
    """Construct a model with meta parameters and no weight initialisation, one build at a time.

    transformers initialises every weight after construction (`init_weights`);
    on meta parameters that does nothing useful and costs as much as the rest
    of the build, so it is switched off with transformers' own `no_init_weights`.
    """
    with _BUILD_LOCK, _no_init_weights(), parameters_on_meta():
        yield


def _no_init_weights() -> contextlib.AbstractContextManager[None]:
    import importlib

    # transformers 5 has it in `initialization`, 4.x in `modeling_utils`.
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            factory = getattr(importlib.import_module(where), "no_init_weights", None)
        except ImportError:
            continue
        if factory is not None:
            return factory()
    return contextlib.nullcontext()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block, every parameter a module registers is moved to the meta device."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = dict(param.__dict__)
            meta = param.to("meta")
            module._parameters[name] = type(param)(
                meta, requires_grad=param.requires_grad, **kwargs
            )

    nn.Module.register_parameter = register  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def model_class(config: Any) -> Any:
    """The transformers class a config asks for (its `architectures`, else an Auto class)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return AutoModel


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    pool: HostPool | None = None,
    cls: Any = None,
    verify: str = "always",
    threads: int = DEFAULT_THREADS,
) -> Any:
    """A transformers model (eval mode) from a converted folder, without random init."""
    folder = Path(path)
    _check_single_device(device)
    if not (folder / "config.json").is_file():
        raise FormatError(f"{folder}: no config.json; load_model needs a converted model folder")
    state = load(folder, device, pool=pool, verify=verify, threads=threads)
    return build_model(folder, state, device, cls=cls)


def build_model(
    config_folder: str | os.PathLike[str],
    state: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    *,
    cls: Any = None,
) -> Any:
    """A transformers model (eval mode) whose parameters are the given tensors (no copy).

    `config_folder` holds config.json; the tensors come from `load()` on the
    same device, so the model's weights are the loader's buffers.
    """
    folder = Path(config_folder)
    _check_single_device(device)
    model = _skeleton(folder, cls)
    state = _match_prefix(model, state)
    check_tensors(folder, model, state)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model, "tie_weights", None) is not None:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise FormatError(f"{folder}: checkpoint lacks weights for {missing[:8]}")
    model.to(torch.device(device))  # buffers created at construction; parameters stay put
    return model.eval()


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a JSON object; FormatError names what makes it unusable.

    Python's json reads 1e400 as infinity and accepts NaN; no model field means
    either, and transformers would fail on them deep inside a model's constructor.
    """
    path = folder / "config.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{folder}: no config.json; a model needs its config") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not readable as JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: must hold a JSON object, not {type(doc).__name__}")
    bad = _non_finite(doc, "")
    if bad is not None:
        raise FormatError(f"{path}: {bad[0]!r} is {bad[1]}, not a finite number")
    return doc


def _non_finite(value: object, where: str) -> tuple[str, float] | None:
    """The first (path, value) in a JSON document whose number is infinite or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    items: Iterable[tuple[object, object]] = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _skeleton(folder: Path, cls: Any) -> Any:
    """The model `config.json` describes, parameters on the meta device; FormatError if it cannot be."""
    from transformers import AutoConfig

    read_config(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
        cls = cls or model_class(config)
        with skeleton_build():
            if hasattr(cls, "from_config"):
                return cls.from_config(config)
            return cls._from_config(config)
    except torch.cuda.OutOfMemoryError:
        raise
    except _CONFIG_ERRORS as exc:
        # Whatever a model's constructor raises on values it cannot build from.
        raise FormatError(
            f"{folder}/config.json does not describe a buildable model: {exc}"
        ) from exc


def check_tensors(folder: Path, model: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Every checkpoint tensor fits the model config.json describes, or FormatError naming it.

    Shapes must match the model's exactly; a tensor the model holds as floating
    point must be floating point in the checkpoint (and any other kind exactly
    its dtype); and the floating point weights share one dtype (the one most
    bytes have), but for modules the model class keeps in float32 — a model
    computes in one dtype, and a stray tensor would fail its first forward pass.
    """
    expected = model.state_dict()
    dtype_note = _declared_dtype(model)
    for name, t in state.items():
        want = expected.get(name)
        if want is None:
            continue  # not part of this model class (another head): ignored, as by transformers
        if tuple(t.shape) != tuple(want.shape):
            raise FormatError(
                f"{folder}: tensor {name!r} has shape {list(t.shape)} in the checkpoint, "
                f"but config.json makes it {list(want.shape)}"
            )
        same_kind = t.dtype.is_floating_point == want.dtype.is_floating_point and (
            t.dtype.is_floating_point or t.dtype == want.dtype
        )
        if not same_kind:
            raise FormatError(
                f"{folder}: tensor {name!r} is {_name(t.dtype)} in the checkpoint, "
                f"but the model needs {'floating point' if want.dtype.is_floating_point else _name(want.dtype)}"
            )
    weights = dict(model.named_parameters(remove_duplicate=False))
    floats = {
        n: t
        for n, t in state.items()
        if n in weights and t.dtype.is_floating_point and not _kept_in_fp32(model, n)
    }
    by_bytes: dict[torch.dtype, int] = {}
    for t in floats.values():
        by_bytes[t.dtype] = by_bytes.get(t.dtype, 0) + t.numel() * t.element_size()
    if len(by_bytes) > 1:
        main = max(by_bytes, key=lambda d: by_bytes[d])
        name, stray = next((n, t) for n, t in floats.items() if t.dtype != main)
        raise FormatError(
            f"{folder}: tensor {name!r} is {_name(stray.dtype)} in the checkpoint, but the "
            f"model's other weights are {_name(main)}{dtype_note}; a model computes in one dtype"
        )


def _declared_dtype(model: Any) -> str:
    config = getattr(model, "config", None)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return f" (config.json says {_name(declared)})" if isinstance(declared, torch.dtype) else ""


def _kept_in_fp32(model: Any, name: str) -> bool:
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return bool(keep & set(name.split(".")))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_single_device(device: object) -> None:
    if (isinstance(device, str) and device == "auto") or not isinstance(
        device, (str, torch.device)
    ):
        raise ValueError("load_model places a model on one device; use load() for a device map")


def _match_prefix(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add or strip the base-model prefix when the checkpoint came from the other head."""
    prefix = getattr(model, "base_model_prefix", "")
    expected = set(model.state_dict().keys())
    if not prefix or not state or set(state) & expected:
        return state
    dotted = prefix + "."
    if all(k.startswith(dotted) for k in state):
        return {k[len(dotted) :]: v for k, v in state.items()}
    return {dotted + k: v for k, v in state.items()}
