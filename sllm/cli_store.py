"""What the CLI's commands that publish models share: the store, and what a push says."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from sllm.store import PushResult, Store


def open_store_from_env(uri: str | None, *, failure: str = "") -> Store:
    """The store named by --store (or the environment's default), with SLLM_S3_* settings.

    A store that cannot be opened stops the command with its message (after `failure`).
    """
    from sllm.core.errors import SllmError
    from sllm.store import StoreSettings, default_store_uri, open_store

    try:
        settings = StoreSettings.from_env(os.environ)
        return open_store(uri or default_store_uri(os.environ), settings)
    except SllmError as exc:
        raise click.ClickException(f"{failure}{exc.message}") from None


def echo_pushed(result: PushResult, *, label: str = "") -> str:
    """Say what a push did (`label` before an unchanged model's name); the model's name."""
    published = result.model
    if result.unchanged:
        click.echo(f"{label}{published.name} unchanged (digest {published.digest})")
    else:
        click.echo(
            f"pushed {published.name} digest={published.digest} ({published.total_bytes} bytes)"
        )
    return published.name
