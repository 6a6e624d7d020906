"""Invokers' own pages (metrics, status) read through the controller, for admins.

An invoker answers only with the internal token, which the embedded server
never shows; an admin key reads them here instead (the controller adds the
token), so `sllm server start` users and Prometheus scrape jobs with an admin
key see every invoker without being given the token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select

from sllm.core.errors import NotFound
from sllm.db import Invoker

if TYPE_CHECKING:
    from ._service import Controller

# page name in /api/v1/invokers/{invoker}/{page} -> the invoker's path
PAGES = {"metrics": "/metrics", "status": "/v1/status"}
PAGE_TIMEOUT_S = 10.0


def invoker_page(controller: Controller, name: str, page: str) -> tuple[str, bytes]:
    """The content type and body of invoker `name`'s `page` (NotFound for either unknown)."""
    path = PAGES.get(page)
    if path is None:
        raise NotFound(f"no invoker page {page!r}; there are {', '.join(sorted(PAGES))}")
    with controller.db.session() as s:
        url = s.execute(select(Invoker.url).where(Invoker.name == name)).scalar_one_or_none()
    if url is None:
        raise NotFound(f"no invoker named {name!r}")
    return controller.invokers.get(url, path, PAGE_TIMEOUT_S)
