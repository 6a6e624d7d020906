"""Shared test set-up: `gpu` tests skip without CUDA; transformers stays quiet."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Silence transformers' progress bars in test output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when this machine has no usable CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
