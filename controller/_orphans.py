"""The database side of reconciling with an invoker: its instance rows, and unloading orphans.

The decision itself is pure (see _reconcile); this module reads the rows it
takes and carries out its unloads, off the heartbeat's request thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor

from sqlalchemy import select
from sqlalchemy.orm import Session

from sllm.db import Database, Function, Instance, Namespace

from ._reconcile import Row

log = logging.getLogger("sllm.controller")


def instance_rows(s: Session, invoker_id: int) -> list[Row]:
    """The controller's instance rows on one invoker, named as the invoker names them."""
    return [
        Row(i, f"{ns}/{name}", state, in_flight, created_at)
        for i, state, in_flight, created_at, name, ns in s.execute(
            select(
                Instance.id,
                Instance.state,
                Instance.in_flight,
                Instance.created_at,
                Function.name,
                Namespace.name,
            )
            .join(Function, Function.id == Instance.function_id)
            .join(Namespace, Namespace.id == Function.namespace_id)
            .where(Instance.invoker_id == invoker_id)
        ).all()
    ]


class OrphanUnloader:
    """Unloads instances an invoker holds without a row, one call at a time per instance."""

    def __init__(
        self, db: Database, pool: Executor, unload: Callable[[str, str, str | None], None]
    ) -> None:
        self._db = db
        self._pool = pool
        self._unload = unload  # (invoker url, "namespace/function", instance id or None)
        self._lock = threading.Lock()
        self._pending: set[tuple[str, str]] = set()

    def submit(self, invoker_id: int, url: str, function: str, instance: str | None = None) -> None:
        """Unload instance `instance` of `function` on the invoker soon, unless that is already
        under way (without an id: the invoker's one instance of `function`)."""
        key = (url, instance or function)
        with self._lock:
            if key in self._pending:  # every heartbeat reports it until it is gone
                return
            self._pending.add(key)
        try:
            self._pool.submit(self._run, invoker_id, url, function, instance)
        except RuntimeError:  # the pool is shut down: the controller is closing
            with self._lock:
                self._pending.discard(key)
            log.info("not unloading %s on %s: the controller is closing", function, url)

    def _run(self, invoker_id: int, url: str, function: str, instance: str | None) -> None:
        try:
            if not self._placed(invoker_id, function, instance):
                log.info(
                    "unloading %s (instance %s) on %s: the controller has no row for it",
                    function,
                    instance,
                    url,
                )
                self._unload(url, function, instance)
        finally:
            with self._lock:
                self._pending.discard((url, instance or function))

    def _placed(self, invoker_id: int, function: str, instance: str | None) -> bool:
        # Placed there (again) since the heartbeat was read: it is no orphan any more.
        if instance is not None:
            if not instance.isdigit() or len(instance) > 18:
                return False  # not an id this controller gives: never one of its rows
            with self._db.session() as s:
                found = s.execute(
                    select(Instance.id).where(
                        Instance.id == int(instance), Instance.invoker_id == invoker_id
                    )
                ).first()
            return found is not None
        ns, _, name = function.partition("/")
        with self._db.session() as s:
            found = s.execute(
                select(Instance.id)
                .join(Function, Function.id == Instance.function_id)
                .join(Namespace, Namespace.id == Function.namespace_id)
                .where(
                    Instance.invoker_id == invoker_id, Namespace.name == ns, Function.name == name
                )
            ).first()
        return found is not None
