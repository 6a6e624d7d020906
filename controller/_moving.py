"""Asking for a live migration, and handing the request to the process that relays it.

    POST /api/v1/namespaces/{ns}/activations/{id}/migrate  {"to"?: invoker name}  -> 202

A running stream's activation has no row yet (it is stored when it ends), and the
process that relays it may be another worker or replica than the one that took the
request. So the request goes into `migration_requests`, after checks that need no
relay: the generation runs now (its invoker's registry says so, by activation id), in
this namespace, with one choice, and `to` (when given) is another active invoker. Every
controller process looks, a few times a second, for requests naming an activation it
relays (`take`, which deletes what it returns: one process takes each request), and
runs the migration (controller/_resume.py `GenerationStream.migrate`). A request that no
process takes (its stream ended meanwhile) is dropped after `STALE_S`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from sllm.core.errors import Conflict, InvalidRequest, NotFound, SllmError
from sllm.core.messages import require_object, show_value
from sllm.db import Activation, Database, Invoker, MigrationRequest, Namespace, table

from ._dispatch import rowcount
from ._invokers import InvokerClient, is_invoker_name

WATCH_S = 0.2  # how often a controller process looks for requests naming its streams
STALE_S = 60.0  # a request no process took by then is dropped (its stream had ended)
LOOKUP_TIMEOUT_S = 5.0
_RUNNING = ("running", "queued", "preempted")


def parse_target(body: Any) -> str | None:
    """The body's "to" (an invoker name) or None; InvalidRequest for anything else."""
    doc = require_object(body)
    unknown = sorted(set(doc) - {"to"})
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {unknown}; the body takes only 'to'", param=unknown[0]
        )
    to = doc.get("to")
    if to is None:
        return None
    if not isinstance(to, str) or not is_invoker_name(to):
        raise InvalidRequest(f"'to' must be an invoker's name, got {show_value(to)}", param="to")
    return to


class MigrationRequests:
    """The `migration_requests` table: asked by the API, taken by the relaying process."""

    def __init__(self, db: Database, invokers: InvokerClient) -> None:
        self.db = db
        self.invokers = invokers

    def request(
        self, namespace: str, activation_id: str, to: str | None, reason: str
    ) -> dict[str, Any]:
        """Check and record a migration of `activation_id`; the 202 answer's document."""
        with self.db.session(write=False) as s:
            ns = s.execute(select(Namespace.id).where(Namespace.name == namespace)).scalar()
            if ns is None:
                raise NotFound(f"no namespace {namespace!r}")
            status = s.execute(
                select(Activation.status).where(
                    Activation.id == activation_id, Activation.namespace_id == ns
                )
            ).scalar()
            invokers = s.execute(select(Invoker.name, Invoker.url, Invoker.state)).all()
        if status is not None and status not in ("running", "queued"):
            raise Conflict(f"activation {activation_id} has ended ({status}): nothing to move")
        source = self._where(
            namespace, activation_id, [(n, u) for n, u, st in invokers if st != "lost"]
        )
        if to is not None:
            state = {n: st for n, _, st in invokers}.get(to)
            if state is None:
                raise NotFound(f"no invoker named {to!r}", param="to")
            if state != "active":
                raise Conflict(f"invoker {to!r} is {state}: it takes no new work", param="to")
            if to == source:
                raise Conflict(f"activation {activation_id} runs on {to!r} already", param="to")
        now = time.time()
        values = {
            "activation_id": activation_id,
            "namespace_id": ns,
            "to_invoker": to,
            "reason": reason,
            "requested_at": now,
        }
        insert = (postgresql if self.db.dialect == "postgresql" else sqlite).insert(
            MigrationRequest
        )
        upsert = insert.values(**values).on_conflict_do_update(
            index_elements=["activation_id"],
            set_={k: v for k, v in values.items() if k != "activation_id"},
        )
        with self.db.session(write=True) as s:
            s.execute(upsert)
        return {"activationId": activation_id, "from": source, "to": to, "status": "requested"}

    def take(self, activation_ids: Sequence[str]) -> list[tuple[str, str | None, str]]:
        """The requests naming `activation_ids` (activation, to, reason), removed: each is
        taken once. Requests older than STALE_S are dropped on the way."""
        if not activation_ids:
            return []
        t = table(MigrationRequest)
        taken = []
        with self.db.connect(write=True) as conn:
            rows = conn.execute(
                select(t.c.activation_id, t.c.to_invoker, t.c.reason).where(
                    t.c.activation_id.in_(list(activation_ids))
                )
            ).all()
            for a, to, reason in rows:  # a conditional delete: one process takes each
                if rowcount(conn.execute(delete(t).where(t.c.activation_id == a))) == 1:
                    taken.append((a, to, reason))
            conn.execute(delete(t).where(t.c.requested_at < time.time() - STALE_S))
        return taken

    def _where(self, namespace: str, activation_id: str, invokers: list[tuple[str, str]]) -> str:
        """The invoker running the activation's generation (its registry, by id)."""
        for name, url in invokers:
            try:
                _, raw = self.invokers.get(
                    url, f"/v1/generations/{quote(activation_id)}", LOOKUP_TIMEOUT_S
                )
            except SllmError:
                continue  # not there (404), or that invoker does not answer
            doc = json.loads(raw)
            if not str(doc.get("function", "")).startswith(f"{namespace}/"):
                continue
            if doc.get("state") in _RUNNING:
                return name
            raise Conflict(
                f"activation {activation_id} is {doc.get('state')} on {name!r}: nothing to move"
            )
        raise NotFound(
            f"no running generation {activation_id} in namespace {namespace!r} "
            "(a generation with n > 1 choices cannot be migrated yet)"
        )
