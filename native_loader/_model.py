"""Building a transformers model straight from a converted checkpoint.

The model skeleton is built with its parameters on the meta device (no
memory, no random initialisation); buffers that are not saved in
checkpoints (rotary frequencies, position ids) are created for real. The
loaded tensors are then assigned in place of the meta parameters, so the
weights are the loader's buffers: no copy on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import FormatError
from ._load import load
from ._pool import HostPool
from ._read import DEFAULT_THREADS

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
    from transformers import AutoConfig

    folder = Path(config_folder)
    _check_single_device(device)
    if not (folder / "config.json").is_file():
        raise FormatError(f"{folder}: no config.json; a model needs its config")
    config = AutoConfig.from_pretrained(folder)
    cls = cls or model_class(config)
    with skeleton_build():
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    state = _match_prefix(model, state)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model, "tie_weights", None) is not None:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise FormatError(f"{folder}: checkpoint lacks weights for {missing[:8]}")
    model.to(torch.device(device))  # buffers created at construction; parameters stay put
    return model.eval()


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
