"""Attaching to a generation another controller process relayed: a client reconnects.

    locate(db, invokers, namespace, activation_id)   its invoker streams (the registries)
    plan_attach(found) -> AttachPlan                 which to replay, which to follow
    reattached_run(row, namespace, ns_id, fn, id)    the activation, continued

A client whose connection dropped, or whose controller replica died, reconnects to
any controller process with `Last-Event-ID` (see _reconnect). The generation kept
running on its invoker, which records a resumable stream's events (invoker/_feed.py),
so this process asks every invoker's generation registry for the activation id, reads
the streams it finds from their start events through a Relay (a generation that moved
has one per invoker it ran on: the ended ones whole, oldest first, then the one it runs
on now, live), and sends the client what it lacks. It relays from then on as if it
had started the generation: losses resume, and it stores the activation at the end.

What the registries can say, and what the plan does:

    running                          replay the ended streams before it, follow it
    held (a migration target)        cancelled: its controller died before the switch
    paused, nothing running          replay; the paused choice resumes elsewhere (the
                                     controller died between the pause and the continue)
    finished                         replay up to it: the client gets the rest at once
    cancelled / failed only          409: nobody came back within the invoker's grace

Caveat: an ended invoker stream stays readable for a minute (invoker/_generations.py
RETAIN_S); a generation that moved before that has its early tokens only in streams
that are gone, so a client further back than the oldest stream left gets a 409.
Only generations with one choice attach (n > 1 answer 409).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from sqlalchemy import select

from sllm.core.errors import Conflict, NotFound, SllmError
from sllm.db import Activation, Database, Function, Invoker

from ._activations import Run, status_of
from ._choices import Choices
from ._config import ControllerConfig
from ._dispatch import Dispatcher, Slot
from ._invokers import InvokerClient
from ._moving import registry_entries
from ._reconnect import marks, missing
from ._resume import GenerationStream, TimedOut, partial_result

log = logging.getLogger("sllm.controller")
Event = dict[str, Any]
LOOKUP_TIMEOUT_S = 5.0
RUNNING = ("running", "queued", "preempted")
REPLAYED = ("paused", "finished")


@dataclass(frozen=True)
class Found:
    """One invoker's registry entry for the generation."""

    invoker: str
    invoker_id: int
    url: str
    state: str  # running | queued | preempted | held | paused | finished | cancelled | failed
    tokens: int
    instance: str
    function: str  # "namespace/name"


@dataclass(frozen=True)
class AttachPlan:
    replays: list[Found]  # ended streams, read whole, oldest first
    live: Found | None  # the stream it runs on now
    stale: list[Found]  # held copies left by a migration that never switched: cancelled


def plan_attach(found: list[Found], activation_id: str) -> AttachPlan:
    """What to read of the registries' entries (see the module docstring).

    Example: [S paused at 20, D running at 25, X held at 18] -> replays [S], live D,
    stale [X]; [S cancelled] -> Conflict.
    """
    live = [f for f in found if f.state in RUNNING]
    stale = [f for f in found if f.state == "held"]
    ended = sorted((f for f in found if f.state in REPLAYED), key=lambda f: f.tokens)
    if live:
        ahead = max(live, key=lambda f: f.tokens)
        replays = [f for f in ended if f.tokens <= ahead.tokens]
        return AttachPlan(replays, ahead, stale)
    finished = [f for f in ended if f.state == "finished"]
    if finished:
        last = finished[0]
        return AttachPlan([f for f in ended if f.tokens <= last.tokens], None, stale)
    if ended:
        return AttachPlan(ended, None, stale)
    states = ", ".join(f"{f.state} on {f.invoker}" for f in found) or "nowhere"
    raise Conflict(
        f"generation {activation_id} does not run any more ({states}): no client read it "
        "within the invoker's detach grace; its record holds what was sent"
    )


def locate(
    db: Database, invokers: InvokerClient, namespace: str, activation_id: str
) -> list[Found]:
    """The entries of generation `activation_id` of `namespace` in every invoker's registry;
    NotFound when none has it."""
    rows = _invoker_rows(db)
    ids = {name: invoker_id for invoker_id, name, _ in rows}
    entries = registry_entries(invokers, [(n, u) for _, n, u in rows], namespace, activation_id)
    found = [
        Found(
            name,
            ids[name],
            url,
            str(doc.get("state")),
            int(doc.get("tokens") or 0),
            str(doc.get("instance", "")),
            str(doc.get("function", "")),
        )
        for name, url, doc in entries
        if doc.get("id") == activation_id  # one choice: its entry has the activation's id
    ]
    if not found:
        raise NotFound(
            f"no generation {activation_id} runs in namespace {namespace!r}, or ran in the "
            "last minute (a generation with n > 1 choices cannot be reattached yet); its "
            f"record: GET /api/v1/namespaces/{namespace}/activations/{activation_id}"
        )
    return found


def cancel(
    db: Database, invokers: InvokerClient, namespace: str, activation_id: str
) -> dict[str, Any]:
    """Stop a running generation now, wherever it runs (the user's "stop generating": a
    client that only closes its stream leaves it running for the detach grace, for a
    reconnect). Its stream, if anyone reads it, ends with finish reason "cancelled"."""
    targets = [(name, url) for _, name, url in _invoker_rows(db)]
    cancelled, ended = [], []
    for name, url, g in registry_entries(invokers, targets, namespace, activation_id):
        if g.get("state") in (*RUNNING, "held"):
            invokers.cancel(url, quote(str(g["id"])), LOOKUP_TIMEOUT_S)
            cancelled.append({"invoker": name, "generation": g["id"]})
        else:
            ended.append(str(g.get("state")))
    if cancelled:
        return {"activationId": activation_id, "cancelled": cancelled}
    if ended:
        raise Conflict(f"activation {activation_id} has ended ({', '.join(sorted(set(ended)))})")
    raise NotFound(f"no generation {activation_id} runs in namespace {namespace!r}")


def _invoker_rows(db: Database) -> list[Any]:
    """(id, name, url) of every invoker not lost."""
    with db.session(write=False) as s:
        return list(
            s.execute(
                select(Invoker.id, Invoker.name, Invoker.url).where(Invoker.state != "lost")
            ).all()
        )


def reattached_run(
    row: Activation | None, namespace: str, namespace_id: int, fn: Function, activation_id: str
) -> Run:
    """The Run a reconnect continues: the stored record when the first process wrote one
    (a client that went away), else a new one under the same id (that process died)."""
    if row is None:
        return Run(
            id=activation_id,
            namespace_id=namespace_id,
            namespace=namespace,
            function=fn.name,
            function_version=fn.version,
            model=fn.model,
            task=fn.task,
            request={},
            blocking=False,
            stream=True,
            attached=True,
        )
    run = Run.of(row, namespace)
    run.blocking, run.stream, run.attached = False, True, True
    run.claim, run.body, run.validated = None, None, True  # it runs: nothing to validate
    run.start_at, run.wait_ms, run.load_ms = row.start_at, row.wait_ms, row.load_ms
    run.tier, run.cold, run.ttft_ms = row.tier, row.cold, row.ttft_ms
    run.tokens_in, run.invoker = row.tokens_in, row.invoker
    run.moves = [dict(m) for m in row.moves or []]
    return run


def stored(db: Database, namespace_id: int, activation_id: str) -> Activation | None:
    with db.session(write=False) as s:
        row = s.execute(
            select(Activation).where(
                Activation.id == activation_id, Activation.namespace_id == namespace_id
            )
        ).scalar()
        if row is not None:
            s.expunge(row)
        return row


class Host(Protocol):
    """What attaching needs of the controller (controller/_service.py)."""

    db: Database
    invokers: InvokerClient
    dispatcher: Dispatcher
    config: ControllerConfig

    def namespace_id(self, name: str) -> int | None: ...
    def function_for(self, namespace: str, name: str, *, fresh: bool = False) -> Function: ...
    def generation_stream(self, run: Run, fn: Function, text: Choices) -> GenerationStream: ...
    def relaying(self, run: Run, gen: GenerationStream | None) -> None: ...
    def store(self, run: Run, slot: Slot | None) -> None: ...


def reattach(
    host: Host, namespace: str, activation_id: str, have: Mapping[int, int]
) -> tuple[Run, Generator[Event, None, None]]:
    """The activation and the events a client that has `have` of it lacks (see the module
    docstring); NotFound / Conflict before anything is sent when it cannot attach."""
    ns_id = host.namespace_id(namespace)
    if ns_id is None:
        raise NotFound(f"no namespace {namespace!r}")
    plan = plan_attach(locate(host.db, host.invokers, namespace, activation_id), activation_id)
    head = plan.live or plan.replays[-1]
    fn = host.function_for(namespace, head.function.split("/", 1)[1], fresh=True)
    run = reattached_run(stored(host.db, ns_id, activation_id), namespace, ns_id, fn, activation_id)
    return run, _events(host, run, fn, plan, have)


def _events(
    host: Host, run: Run, fn: Function, plan: AttachPlan, have: Mapping[int, int]
) -> Generator[Event, None, None]:
    deadline = time.monotonic() + fn.timeout_s
    text = Choices()
    moves = list(run.moves)
    gen = host.generation_stream(run, fn, text)
    gen.relay.moves.extend(moves)
    for f in plan.stale:  # a migration target its dead controller never switched to
        threading.Thread(
            target=host.invokers.cancel, args=(f.url, run.id, 5.0), daemon=True
        ).start()
    where = plan.live.invoker if plan.live else "its last invoker"
    run.log(f"a client reconnected from token {marks(have)}; attached on {where}")
    timeout = max(0.1, deadline - time.monotonic())
    path = f"/v1/generations/{quote(run.id)}/events"
    stall = host.config.stall_timeout
    replays = [
        (f.invoker, host.invokers.stream(f.url, None, timeout, path=path, stall=stall))
        for f in plan.replays
    ]
    slot: Slot | None = None
    live = None
    if plan.live is not None:
        f = plan.live
        instance = int(f.instance) if f.instance.isdigit() else 0
        slot = host.dispatcher.adopt(instance, f.invoker_id, f.invoker, f.url)
        live = (slot, host.invokers.stream(f.url, None, timeout, path=path, stall=stall))
        if run.invoker is None:
            run.dispatched(f.invoker)
    host.relaying(run, gen)
    try:
        for ev in missing(gen.reattach(replays, live, deadline), have):
            if ev.get("event") == "start":
                _check_reachable(ev, have, run.id)
                ev = {**ev, "reattached": True}
                if run.start_at is None or run.tokens_in is None:
                    run.started(ev)
            yield ev
    except GeneratorExit:
        if run.end_at is None:
            run.result = partial_result(run, text, "cancelled")
            run.finish("success")
            run.log("the client went away again; the generation runs on for a reconnect")
            run.detached = True
        raise
    except SllmError as exc:
        if run.end_at is None:
            run.finish(status_of(exc) if not isinstance(exc, TimedOut) else "timeout", error=exc)
        raise
    finally:
        host.relaying(run, None)
        gen.close()
        for _, stream in replays:
            stream.close()
        host.store(run, gen.slot if gen.slot is not None else None)


def _check_reachable(start: Mapping[str, Any], have: Mapping[int, int], activation_id: str) -> None:
    """Conflict when the oldest stream left begins after what the client has."""
    for c, state in enumerate(start.get("states") or []):
        done = len(state.get("tokens") or []) - int(state.get("prompt_len") or 0)
        if done > have.get(c, 0):
            raise Conflict(
                f"generation {activation_id} moved since token {have.get(c, 0)} and the "
                f"invoker streams left begin at token {done}: the tokens between are gone"
            )
