"""Asking for a live migration, and handing the request to the process that relays it.

    POST /api/v1/namespaces/{ns}/activations/{id}/migrate  {"to"?: invoker name}  -> 202

A running stream's activation has no row yet (it is stored when it ends), and the
process that relays it may be another worker or replica than the one that took the
request. So the request goes into `migration_requests`, after checks that need no
relay: the generation runs now (its invoker's registry says so, by activation id), in
this namespace, and `to` (when given) is another active invoker. Every
controller process looks, a few times a second, for requests naming an activation it
relays (`take`, which deletes what it returns: one process takes each request), and
runs the migration (controller/_resume.py `GenerationStream.migrate`). A request that no
process takes (its stream ended meanwhile) is dropped after `STALE_S`.

A drain asks the same way (`MigrateAway`, the drain's `GenerationMover`): reason
"drain", any other invoker, for each activation its draining invoker runs.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from sllm.core.errors import Conflict, InvalidRequest, NotFound, SllmError
from sllm.core.messages import require_object, show_value
from sllm.db import Activation, Database, Invoker, MigrationRequest, Namespace, table

from ._dispatch import rowcount
from ._invokers import InvokerClient, is_invoker_name
from ._live import DRAIN

log = logging.getLogger("sllm.controller")

WATCH_S = 0.2  # how often a controller process looks for requests naming its streams
STALE_S = 60.0  # a request no process took by then is dropped (its stream had ended)
LOOKUP_TIMEOUT_S = 5.0
_RUNNING = ("running", "queued", "preempted")
_GENERATION = re.compile(r"([0-9a-f]{32})(?:\.[0-9]+)?")


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
        self._ask(activation_id, ns, to, reason)
        return {"activationId": activation_id, "from": source, "to": to, "status": "requested"}

    def drain(self, invoker: str, activation_ids: Sequence[str]) -> list[str]:
        """Ask for a drain's migration (to any other invoker) of each of `activation_ids`
        that runs on `invoker` now, as its registry lists it; the ones asked. SllmError
        when the invoker does not answer."""
        with self.db.session(write=False) as s:
            url = s.execute(select(Invoker.url).where(Invoker.name == invoker)).scalar()
        if url is None:
            return []
        _, raw = self.invokers.get(url, "/v1/generations", LOOKUP_TIMEOUT_S)
        wanted, running = set(activation_ids), {}
        for doc in json.loads(raw).get("generations") or []:
            activation = activation_of(str(doc.get("id")))
            if activation in wanted and doc.get("state") in _RUNNING:
                running[activation] = str(doc.get("function", "")).split("/", 1)[0]
        with self.db.session(write=False) as s:
            names = set(running.values())
            ids = dict(
                s.execute(
                    select(Namespace.name, Namespace.id).where(Namespace.name.in_(names))
                ).all()
            )
        asked = sorted(a for a, ns in running.items() if ns in ids)
        for activation in asked:
            self._ask(activation, ids[running[activation]], None, DRAIN)
        return asked

    def _ask(self, activation_id: str, namespace_id: int, to: str | None, reason: str) -> None:
        """Record the request (a newer one for the same activation replaces it)."""
        values = {
            "activation_id": activation_id,
            "namespace_id": namespace_id,
            "to_invoker": to,
            "reason": reason,
            "requested_at": time.time(),
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
        """The invoker running the activation's generation (its registry, by id: the
        activation's own, or "{id}.{i}" for the choices of a generation with n > 1)."""
        ended = None
        for name, _, doc in registry_entries(self.invokers, invokers, namespace, activation_id):
            if doc.get("state") in _RUNNING:
                return name
            ended = ended or (name, doc.get("state"))
        if ended is not None:
            raise Conflict(
                f"activation {activation_id} is {ended[1]} on {ended[0]!r}: nothing to move"
            )
        raise NotFound(f"no running generation {activation_id} in namespace {namespace!r}")


def registry_entries(
    client: InvokerClient, invokers: Sequence[tuple[str, str]], namespace: str, activation_id: str
) -> list[tuple[str, str, dict[str, Any]]]:
    """(invoker name, url, entry) for every entry of the activation's generation ("{id}",
    or "{id}.{i}" per choice) in namespace `namespace`, in the registries of `invokers`
    ((name, url) each; one that does not answer is passed over)."""
    found = []
    for name, url in invokers:
        try:
            _, raw = client.get(url, "/v1/generations", LOOKUP_TIMEOUT_S)
        except SllmError:
            continue  # that invoker does not answer
        for doc in json.loads(raw).get("generations") or []:
            if activation_of(str(doc.get("id"))) != activation_id:
                continue
            if str(doc.get("function", "")).startswith(f"{namespace}/"):
                found.append((name, url, doc))
    return found


def activation_of(generation_id: str) -> str | None:
    """The activation a generation id on an invoker belongs to ("{id}" or "{id}.{choice}"),
    None for one the controller did not start."""
    found = _GENERATION.fullmatch(generation_id)
    return found.group(1) if found else None


class MigrateAway:
    """The drain's `GenerationMover` (controller/_drain.py): a live migration (reason
    "drain") of every generation running on the draining invoker, asked through
    `migration_requests`, so the process relaying it (any worker or replica) moves it.

    Each activation is asked for once per drain (per controller process; a drain is
    known by its deadline, so a new drain, or a new grace, asks again): the relaying
    process moves every choice of it, and several generations of one instance, asked in
    one pass, move at once (their rounds batched on the destination). One that cannot
    move (no other invoker takes it, its migration aborted, or it is not streaming yet)
    stays, and the drain waits for it to end, up to its grace, as without migration.
    An invoker that does not answer is asked again at the next pass.
    """

    def __init__(self, requests: MigrationRequests) -> None:
        self.requests = requests
        # invoker -> its drain (by deadline) and the activations asked, still running there
        self._asked: dict[str, tuple[float, set[str]]] = {}

    def move_away(self, invoker: str, generations: Sequence[str], deadline: float) -> None:
        """Ask for the migration of the activations of `generations` not asked for yet."""
        there = {a for a in map(activation_of, generations) if a is not None}
        drain, asked = self._asked.get(invoker, (deadline, set()))
        asked = asked & there if drain == deadline else set()  # the ended ones are forgotten
        new = sorted(there - asked)
        if new:
            try:
                moving = self.requests.drain(invoker, new)
            except (SllmError, SQLAlchemyError) as exc:
                log.warning("drain of %s: no migration asked (%s)", invoker, exc)
                return
            log.info("drain of %s: migrating %s", invoker, ", ".join(moving) or "nothing")
            asked |= set(new)
        self._asked[invoker] = (deadline, asked)
