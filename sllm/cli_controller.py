"""`sllm controller start`: run the controller (the cluster's front door) on this host."""

from __future__ import annotations

import os

import click


@click.group()
def controller() -> None:
    """Run the controller (API, dispatch, activations)."""


@controller.command("start")
@click.option("--host", help="Address to bind [SLLM_HOST, 127.0.0.1].")
@click.option(
    "--port", type=int, help="Port [SLLM_PORT, else PORT (Knative), 8700]; 0 picks a free one."
)
@click.option(
    "--port-file", help="Write the bound port to this file once listening [SLLM_PORT_FILE]."
)
@click.option("--database", "database_url", help="Database URL [SLLM_DATABASE_URL, SQLite].")
@click.option("--token", "internal_token", help="Internal token [SLLM_INTERNAL_TOKEN].")
@click.option("--admin-key", help="Bootstrap admin API key [SLLM_ADMIN_KEY].")
@click.option("--workers", type=int, help="Worker processes [SLLM_WORKERS, 2].")
@click.option("--threads", type=int, help="Request threads per worker [SLLM_THREADS, 32].")
@click.option("--domain", help="Knative routing domain [SLLM_DOMAIN, sllm.local].")
def start(**flags: object) -> None:
    """Start the controller in the foreground (gunicorn workers sharing the database)."""
    from sllm.controller import ControllerConfig, serve
    from sllm.db import database_url

    if flags.get("database_url"):
        flags["database_url"] = database_url({"SLLM_DATABASE_URL": str(flags["database_url"])})
    try:
        config = ControllerConfig.from_env(os.environ, **flags)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    serve(config)
