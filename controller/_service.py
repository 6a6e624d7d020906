"""The controller: namespaces and keys, functions, invocations, activations, invokers.

One `Controller` lives in each controller process (each gunicorn worker).
Everything shared lives in the database, so workers and replicas agree; what
a process keeps is its connection pools, the requests it is serving, and two
background threads (non-blocking activations, maintenance).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from sqlalchemy import JSON, Insert, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from sllm.core.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PlatformError,
    SllmError,
    Unauthorized,
    Unavailable,
)
from sllm.core.messages import require_object, show_value
from sllm.db import (
    Activation,
    ApiKey,
    Database,
    Function,
    Instance,
    Invoker,
    Namespace,
    Prepared,
    table,
)
from sllm.runtime import SamplingParams

from . import _attach as attach
from ._activations import STATUSES, Run, activation_json, new_activation_id, status_of
from ._auth import Principal, authenticate, hash_secret, new_key, split_key
from ._catalog import Catalog
from ._choices import Choices, partial_result
from ._config import ControllerConfig
from ._dispatch import (
    RELEASE,
    DeadlineExceeded,
    Dispatcher,
    Slot,
    StaleFunction,
    instance_body,
    rowcount,
)
from ._drain import GenerationMover, reported_drain
from ._draining import Drains, on_heartbeat
from ._functions import FunctionDef, check_invocation_keys, check_name, function_json
from ._invokers import INVOKER_NAME_RULE, InvokerClient, InvokerLost, is_invoker_name
from ._leases import LeaseLost, expire, finish, mark_dispatched, new_claim
from ._metrics import ControllerMetrics
from ._moving import WATCH_S as MIGRATION_WATCH_S
from ._moving import MigrateAway, MigrationRequests, parse_target
from ._orphans import OrphanUnloader, instance_rows
from ._prewarm import CLEARED as PREWARM_CLEARED
from ._prewarm import load_error_json, record_failure
from ._reconcile import Held, held_instances, reconcile
from ._resume import GenerationStream, TimedOut
from ._scheduler import LocalityScheduler, Scheduler

log = logging.getLogger("sllm.controller")

AUTH_TTL = 5.0  # a revoked key stops working within this many seconds
FUNCTION_TTL = 2.0  # a cached function definition is read again after this many seconds
MAX_REBASES = 3  # a function that changes more often under one request: 409
BACKGROUND_THREADS = 4  # prewarm loads and orphan unloads at once per controller process

_ACTIVATIONS, _FUNCTIONS, _NAMESPACES = table(Activation), table(Function), table(Namespace)
_JSON_COLUMNS = frozenset(c.name for c in _ACTIVATIONS.c if isinstance(c.type, JSON))
# Built once (see Dispatcher for why): an invocation's one read; the queue's idle poll.
_ANY_QUEUED = select(_ACTIVATIONS.c.id).where(_ACTIVATIONS.c.status == "queued").limit(1)
_FUNCTION_BY_NAME = (
    select(_FUNCTIONS)
    .join(_NAMESPACES, _NAMESPACES.c.id == _FUNCTIONS.c.namespace_id)
    .where(_NAMESPACES.c.name == bindparam("ns"), _FUNCTIONS.c.name == bindparam("name"))
)


class Controller:
    """The controller's operations; the HTTP layer only parses and formats."""

    def __init__(
        self,
        config: ControllerConfig,
        db: Database,
        *,
        scheduler: Scheduler | None = None,
        mover: GenerationMover | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.catalog = (
            Catalog(config.store_uri, config.store_settings) if config.store_uri else None
        )
        self.name = f"{socket.gethostname()}:{threading.get_native_id()}:{id(self):x}"[:64]
        self.invokers = InvokerClient(config.internal_token)
        self.dispatcher = Dispatcher(
            db, scheduler or LocalityScheduler(), max_queue=config.max_queue
        )
        self.metrics = ControllerMetrics()
        self.dispatcher.gauge = self.metrics.queue
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        # Blocking runs past their wait. Queued activations have their own workers, so a
        # claimed one starts at once (its lease would run out in a backlog); prewarm loads
        # (up to a minute each) and orphan unloads have theirs, so no blocking run waits
        # behind them and is answered 202 before it started.
        self._pool = ThreadPoolExecutor(config.threads, thread_name_prefix="sllm-run")
        self._queue_pool = ThreadPoolExecutor(config.queue_workers, thread_name_prefix="sllm-queue")
        self._background = ThreadPoolExecutor(BACKGROUND_THREADS, thread_name_prefix="sllm-bg")
        self._queue_slots = threading.BoundedSemaphore(config.queue_workers)
        self._keys: dict[str, tuple[Principal, float]] = {}
        self._functions: dict[tuple[str, str], tuple[Function, float]] = {}
        self._prepared: dict[tuple[str, ...], Prepared] = {}
        self._orphans = OrphanUnloader(db, self._background, self._unload_on)
        # Live migrations: asked through the database, run by the process relaying the run.
        self.moving = MigrationRequests(db, self.invokers)
        self._live: dict[str, GenerationStream] = {}  # run id -> its relay, while streaming
        # Draining invokers; `mover` moves their running generations away: by default a
        # live migration of each, through `moving` (see _drain, _moving.MigrateAway).
        self.drains = Drains(
            db,
            mover or MigrateAway(self.moving),
            self._unload_on,
            floor_grace_s=config.functions.timeout_s,
        )

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the background threads (queued activations, maintenance)."""
        for target, name in (
            (self._queue_loop, "queue"),
            (self._maintenance_loop, "maint"),
            (self._migration_loop, "moves"),
        ):
            t = threading.Thread(target=target, name=f"sllm-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        """Stop the background threads and drop connections."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._queue_pool.shutdown(wait=False, cancel_futures=True)
        self._background.shutdown(wait=False, cancel_futures=True)
        self.invokers.close()

    # ------------------------------------------------------------ auth
    def authenticate(self, key: str, *, fresh: bool = False) -> Principal:
        """The principal behind an API key (remembered for AUTH_TTL seconds per process)."""
        now = time.monotonic()
        cached = None if fresh else self._keys.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        with self.db.session() as s:
            principal = authenticate(s, key, self.config.admin_key)
        if len(self._keys) >= 4096:
            self._keys.clear()
        self._keys[key] = (principal, now + AUTH_TTL)
        return principal

    def check_internal(self, token: str) -> None:
        """Invokers' calls carry the internal token."""
        if not hmac.compare_digest(token.encode(), self.config.internal_token.encode()):
            raise Unauthorized("missing or wrong internal token")

    # ------------------------------------------------------------ namespaces and keys
    def create_namespace(self, name: Any) -> dict[str, Any]:
        """A new namespace (409 if it exists)."""
        name = check_name(name, "namespace name")
        try:
            with self.db.session(write=True) as s:
                s.add(Namespace(name=name, created_at=time.time()))
        except IntegrityError:
            raise Conflict(f"namespace {name!r} already exists") from None
        return {"name": name}

    def namespace_id(self, name: str) -> int | None:
        """The id namespace `name` has now (None when there is none)."""
        with self.db.autocommit(durable=False) as conn:
            found = conn.execute(select(Namespace.id).where(Namespace.name == name)).scalar()
        return None if found is None else int(found)

    def ensure_namespace(self, name: str) -> int:
        """The id of namespace `name`, created if missing (server start-up)."""
        with self.db.session(write=True) as s:
            found = s.execute(select(Namespace.id).where(Namespace.name == name)).scalar()
            if found is not None:
                return int(found)
            row = Namespace(name=name, created_at=time.time())
            s.add(row)
            s.flush()
            return row.id

    def list_namespaces(self) -> list[dict[str, Any]]:
        """Every namespace with its function count."""
        with self.db.session() as s:
            rows = s.execute(
                select(Namespace.name, Namespace.created_at, func.count(Function.id))
                .outerjoin(Function, Function.namespace_id == Namespace.id)
                .group_by(Namespace.id)
                .order_by(Namespace.name)
            ).all()
        return [{"name": n, "created": c, "functions": k} for n, c, k in rows]

    def delete_namespace(self, name: str) -> dict[str, Any]:
        """Delete a namespace with its functions, keys and activations; unload its instances."""
        with self.db.session(write=True) as s:
            ns_id = self._namespace_id(s, name)
            placements = s.execute(
                select(Invoker.url, Function.name, Instance.id)
                .join(Instance, Instance.invoker_id == Invoker.id)
                .join(Function, Function.id == Instance.function_id)
                .where(Function.namespace_id == ns_id)
            ).all()
            s.execute(delete(Namespace).where(Namespace.id == ns_id))
        self._functions.clear()
        for url, fname, instance_id in placements:
            self._unload_on(url, f"{name}/{fname}", str(instance_id))
        return {"name": name, "deleted": True}

    def create_key(self, namespace: str, body: Any) -> dict[str, Any]:
        """A new API key for `namespace` (the secret is shown only here)."""
        doc = require_object(body or {})
        label = doc.get("label", "")
        admin = doc.get("admin", False)
        if not isinstance(label, str) or len(label) > 255 or not label.isprintable():
            raise InvalidRequest("'label' must be a string of at most 255 printable characters")
        if not isinstance(admin, bool):
            raise InvalidRequest("'admin' must be true or false")
        key_id, secret, key = new_key()
        with self.db.session(write=True) as s:
            ns_id = self._namespace_id(s, namespace)
            s.add(
                ApiKey(
                    key_id=key_id,
                    secret_hash=hash_secret(secret),
                    namespace_id=ns_id,
                    admin=admin,
                    label=label,
                    created_at=time.time(),
                )
            )
        return {"key": key, "key_id": key_id, "namespace": namespace, "admin": admin}

    def install_key(self, namespace: str, key: str, *, admin: bool) -> None:
        """Store a given key (server start-up with --api-key); replaces a key with its id."""
        key_id, secret = split_key(key)
        with self.db.session(write=True) as s:
            ns_id = self._namespace_id(s, namespace)
            s.execute(delete(ApiKey).where(ApiKey.key_id == key_id))
            s.add(
                ApiKey(
                    key_id=key_id,
                    secret_hash=hash_secret(secret),
                    namespace_id=ns_id,
                    admin=admin,
                    label="server start",
                    created_at=time.time(),
                )
            )

    def list_keys(self, namespace: str) -> list[dict[str, Any]]:
        """The keys of a namespace (ids and labels, never secrets)."""
        with self.db.session() as s:
            ns_id = self._namespace_id(s, namespace)
            rows = s.execute(
                select(ApiKey).where(ApiKey.namespace_id == ns_id).order_by(ApiKey.created_at)
            ).scalars()
            return [
                {
                    "key_id": k.key_id,
                    "label": k.label,
                    "admin": k.admin,
                    "created": k.created_at,
                    "revoked": k.revoked_at,
                }
                for k in rows
            ]

    def revoke_key(self, namespace: str, key_id: str) -> dict[str, Any]:
        """Revoke a key of `namespace`."""
        with self.db.session(write=True) as s:
            ns_id = self._namespace_id(s, namespace)
            done = rowcount(
                s.execute(
                    update(ApiKey)
                    .where(ApiKey.key_id == key_id, ApiKey.namespace_id == ns_id)
                    .values(revoked_at=time.time())
                    .execution_options(synchronize_session=False)
                )
            )
        if not done:
            raise NotFound(f"no key {key_id!r} in namespace {namespace!r}")
        return {"key_id": key_id, "revoked": True}

    # ------------------------------------------------------------ functions
    def put_function(
        self, namespace: str, name: str, body: Any, *, overwrite: bool
    ) -> tuple[dict[str, Any], bool]:
        """Create (or, with overwrite, update) a function: (its JSON, created?)."""
        check_name(name, "function name")
        model = body.get("model") if isinstance(body, Mapping) else None
        if self.catalog is not None and isinstance(model, str):
            self.catalog.require(model)  # before the write transaction: the store may be remote
        kwargs = {
            "defaults": self.config.functions,
            "max_tokens_limit": self.config.max_tokens_limit,
            "max_payload_limit": self.config.max_body_bytes,
        }
        now = time.time()
        with self.db.session(write=True) as s:
            ns_id = self._namespace_id(s, namespace)
            row = s.execute(
                select(Function)
                .where(Function.namespace_id == ns_id, Function.name == name)
                .with_for_update()
            ).scalar_one_or_none()
            if row is None:
                spec = FunctionDef.parse(body, **kwargs)  # type: ignore[arg-type]
                row = Function(
                    namespace_id=ns_id,
                    name=name,
                    version=1,
                    created_at=now,
                    updated_at=now,
                    **spec.columns(),
                )
                s.add(row)
                try:
                    s.flush()
                except IntegrityError:
                    raise Conflict(
                        f"function {name!r} was just created by another request"
                    ) from None
                created = True
            else:
                if not overwrite:
                    raise Conflict(
                        f"function {name!r} exists; update it with ?overwrite=true (sllm fn update)"
                    )
                old = FunctionDef.of(row)
                spec = FunctionDef.parse(body, base=old, **kwargs)  # type: ignore[arg-type]
                for key, value in spec.columns().items():
                    setattr(row, key, value)
                row.version += 1
                row.updated_at = now
                for key, value in PREWARM_CLEARED.items():  # a new definition loads afresh
                    setattr(row, key, value)
                created = False
                if (spec.model, spec.task, spec.concurrency) != (
                    old.model,
                    old.task,
                    old.concurrency,
                ):
                    # Instances of the old definition drain: new requests place anew.
                    s.execute(
                        update(Instance)
                        .where(Instance.function_id == row.id)
                        .values(state="unloading")
                        .execution_options(synchronize_session=False)
                    )
            doc = _function_doc(row, namespace)
        self._functions.pop((namespace, name), None)
        if created and doc["scaling"]["min_instances"] > 0:
            self._wake.set()
        return doc, created

    def get_function(self, namespace: str, name: str) -> dict[str, Any]:
        """One function."""
        with self.db.session() as s:
            return _function_doc(self._function(s, namespace, name), namespace)

    def list_functions(self, namespace: str, limit: int, skip: int) -> list[dict[str, Any]]:
        """A page of functions, by name."""
        with self.db.session() as s:
            ns_id = self._namespace_id(s, namespace)
            rows = s.execute(
                select(Function)
                .where(Function.namespace_id == ns_id)
                .order_by(Function.name)
                .offset(skip)
                .limit(limit)
            ).scalars()
            return [_function_doc(r, namespace) for r in rows]

    def delete_function(self, namespace: str, name: str) -> dict[str, Any]:
        """Delete a function; its instances are unloaded."""
        with self.db.session(write=True) as s:
            row = self._function(s, namespace, name)
            doc = _function_doc(row, namespace)
            placements = s.execute(
                select(Invoker.url, Instance.id)
                .join(Instance, Instance.invoker_id == Invoker.id)
                .where(Instance.function_id == row.id)
            ).all()
            s.execute(delete(Function).where(Function.id == row.id))
        self._functions.pop((namespace, name), None)
        for url, instance_id in placements:
            self._unload_on(url, f"{namespace}/{name}", str(instance_id))
        return doc

    def function_for(self, namespace: str, name: str, *, fresh: bool = False) -> Function:
        """The function an invocation runs: from a per-process cache, checked at dispatch.

        A cached definition is used for up to FUNCTION_TTL seconds. Dispatch
        checks its version in the same statement that takes a slot (see
        Dispatcher.acquire); a request validated against an old definition is
        validated again against the current one before it runs, so a stale
        cache costs a re-read, never a run of an old definition.
        """
        key = (namespace, name)
        now = time.monotonic()
        hit = None if fresh else self._functions.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        with self.db.autocommit(durable=False) as conn:
            row = conn.execute(_FUNCTION_BY_NAME, {"ns": namespace, "name": name}).first()
        if row is None:
            self._functions.pop(key, None)
            raise NotFound(f"no function {name!r} in namespace {namespace!r}")
        fn = Function(**row._mapping)
        if len(self._functions) >= 4096:
            self._functions.clear()
        self._functions[key] = (fn, now + FUNCTION_TTL)
        return fn

    def _current_function(self, run: Run) -> Function:
        """The function of `run` read afresh (its cached definition was stale), `run` rebased."""
        self._functions.pop((run.namespace, run.function), None)
        fn = self.function_for(run.namespace, run.function)
        self._rebase(run, fn)
        return fn

    # ------------------------------------------------------------ invocations
    def new_run(
        self,
        namespace: str,
        fn: Function,
        body: Any,
        *,
        blocking: bool,
        body_bytes: int = 0,
    ) -> Run:
        """Validate an invocation of `fn` and make its Run (nothing stored yet)."""
        _check_payload(fn, body_bytes)
        body = require_object(body, "invocation parameters")
        return Run(
            id=new_activation_id(),
            namespace_id=fn.namespace_id,
            namespace=namespace,
            function=fn.name,
            function_version=fn.version,
            model=fn.model,
            task=fn.task,
            request=self._params(fn, body),
            blocking=blocking,
            body=dict(body),
            body_bytes=body_bytes,
        )

    @staticmethod
    def _params(fn: Function, body: Mapping[str, Any]) -> dict[str, Any]:
        """The invocation parameters: `fn`'s defaults under the caller's, validated."""
        params = {**(fn.params or {}), **body}
        params.pop("stream", None)
        check_invocation_keys(fn.task, params)
        if fn.task == "generate":
            given = [k for k in ("prompt", "messages", "tokens") if params.get(k) is not None]
            if len(given) != 1:
                raise InvalidRequest("give exactly one of 'prompt', 'messages' or 'tokens'")
            # No max_tokens: the invoker fills what the context leaves, up to fn.max_tokens.
            SamplingParams.from_request(params, max_tokens_limit=fn.max_tokens)
        elif params.get("input") is None:
            raise InvalidRequest("'input' is required: a string or a list of strings to embed")
        return params

    def _rebase(self, run: Run, fn: Function) -> None:
        """Validate `run` against `fn`: a newer definition, or the current one of a queued run."""
        if fn.namespace_id != run.namespace_id:
            # The namespace the run was accepted in was deleted (and one of the same name made
            # since): its caller's key died with it, so the run never moves to the namesake.
            raise NotFound(f"no function {run.function!r} in namespace {run.namespace!r}")
        if fn.version != run.function_version:
            run.log(f"function changed to version {fn.version}: parameters checked again")
        _check_payload(fn, run.body_bytes)
        run.request = self._params(fn, run.body if run.body is not None else run.request)
        run.function_version, run.model, run.task = fn.version, fn.model, fn.task
        run.validated = True

    def submit(self, run: Run) -> str:
        """Queue a non-blocking invocation (stored before the 202) and return its id."""
        run.status = "queued"
        run.log("queued")
        cols = run.columns()
        if run.body is not None:  # as sent: validated again against the function when it runs
            cols["request"] = run.body
        try:
            with self.db.connect(write=True) as conn:
                conn.execute(_ACTIVATIONS.insert(), cols)
        except IntegrityError:  # its namespace was deleted since this process cached it
            raise _namespace_gone(run) from None
        run.persisted = True
        self._wake.set()
        return run.id

    def invoke(self, run: Run, fn: Function) -> tuple[Run, bool]:
        """Run a blocking invocation: (the run, finished?).

        When the function may run longer than the blocking wait, it runs on a
        worker thread; if the wait ends first, the activation is stored as
        running and the caller answers 202 with its id.
        """
        if fn.timeout_s <= self.config.blocking_timeout:
            self._drain(run, fn)
            return run, True
        done: Future[None] = self._pool.submit(self._drain, run, fn)
        try:
            done.result(timeout=self.config.blocking_timeout)
            return run, True
        except FutureTimeout:
            self._persist_running(run, fn)
            return run, False

    def _drain(self, run: Run, fn: Function) -> None:
        with contextlib.suppress(SllmError):  # the outcome is in the activation
            for _ in self.execute(run, fn):
                pass

    def execute(self, run: Run, fn: Function) -> Generator[dict[str, Any], None, None]:
        """Run `run` on an instance of `fn`, yielding the invoker's events; store the outcome.

        Generation yields start, token... and done; embedding yields one
        {"event": "result"}. The activation is stored when the generator
        ends, also when the consumer closes it early (a client went away).
        A failure raises its SllmError after the activation is stored.
        """
        started = time.monotonic()
        deadline = started + fn.timeout_s
        slot: Slot | None = None
        text = Choices()
        gen = self.generation_stream(run, fn, text)
        avoid: list[int] = []
        rebases = 0
        try:
            if not run.validated or run.function_version != fn.version:
                self._rebase(run, fn)  # a queued run, or one validated against a cached definition
            while True:
                try:
                    # A run from the database queue was accepted (202): never shed for load.
                    slot = self.dispatcher.acquire(fn, deadline, avoid, bounded=run.blocking)
                except DeadlineExceeded as exc:
                    raise TimedOut(f"{exc} (timeout {fn.timeout_s:g} s)") from None
                except StaleFunction:
                    rebases += 1
                    if rebases > MAX_REBASES:
                        raise Conflict(
                            f"function {fn.name!r} changed {rebases} times while this request "
                            "was dispatched; retry"
                        ) from None
                    fn = self._current_function(run)
                    deadline = started + fn.timeout_s
                    continue
                first = run.dispatched(slot.invoker)
                limit = {"max_tokens_limit": fn.max_tokens}  # the invoker fits max_tokens under it
                body = {
                    **instance_body(run.namespace, fn, slot),
                    **limit,
                    **run.request,
                    # After the request's fields: a client cannot name an instance or id.
                    "instance": str(slot.instance_id),
                    "version": fn.version,
                    "activation": run.id,
                }
                try:
                    if first and run.persisted:  # before it is sent: see _leases
                        # The lease covers the run's deadline (a newer definition may have
                        # given it a longer timeout than the one it was claimed under).
                        lease = time.time() + (deadline - time.monotonic())
                        if not self._mark_dispatched(run, lease + self.config.lease_margin):
                            raise LeaseLost(f"the lease on {run.id} expired: it was not sent")
                    remaining = max(0.1, deadline - time.monotonic())
                    if fn.task == "embed":
                        result = self.invokers.call(slot.url, "/v1/embed", body, remaining)
                        if slot.loading:
                            self.dispatcher.loaded(slot, None, None)
                        run.cold = slot.cold
                        run.tokens_in = (result.get("usage") or {}).get("prompt_tokens")
                        run.finish("success", result=result)
                        yield {"event": "result", "result": result}
                        return
                    gen.fn = fn
                    self._live[run.id] = gen
                    try:
                        yield from gen.events(slot, body, deadline)
                    finally:
                        self._live.pop(run.id, None)
                        gen.close()
                        slot = gen.slot  # a resume may have moved it to another instance
                    return
                except InvokerLost as exc:
                    if gen.started:
                        raise  # it reached the client: resumed as far as it could be
                    if time.monotonic() >= deadline:
                        raise TimedOut(
                            f"function {fn.name!r} ran past its {fn.timeout_s:g} s limit"
                        ) from exc
                    log.warning("%s; retrying %s elsewhere", exc.message, run.id)
                    run.log(f"{exc.message}; retrying elsewhere")
                    if slot is not None:
                        self.dispatcher.drop(slot)
                        avoid.append(slot.invoker_id)
                    slot = None  # its instance row is gone
                except Overloaded:
                    if time.monotonic() >= deadline or slot is None:
                        raise
                    self._released(slot)  # the invoker is full: try again
                    slot = None
                    time.sleep(0.02)
                except SllmError:
                    if slot is not None and slot.cold:
                        self.dispatcher.drop(slot)  # it never became ready
                        slot = None
                    raise
        except GeneratorExit:
            if run.end_at is None:
                run.result = partial_result(run, text, "cancelled")
                run.finish("success")
                if gen.started and run.stream:  # the invoker keeps it for a reconnect
                    run.detached = True
                    run.log(
                        "the client went away; the generation runs on for a while for it to "
                        "reconnect (Last-Event-ID)"
                    )
            raise
        except SllmError as exc:
            if run.end_at is None:
                run.finish(
                    status_of(exc) if not isinstance(exc, TimedOut) else "timeout", error=exc
                )
            raise
        except Exception as exc:
            log.exception("activation %s failed", run.id)
            if run.end_at is None:
                run.finish("platform_error", error=PlatformError(f"internal error: {exc}"))
            raise PlatformError(f"internal error: {exc}") from exc
        finally:
            self._store(run, slot)

    # ------------------------------------------------------------ reconnects (see _attach)
    def reattach(
        self, namespace: str, activation_id: str, have: Mapping[int, int]
    ) -> tuple[Run, Generator[dict[str, Any], None, None]]:
        """A reconnecting client's activation and the events it lacks."""
        return attach.reattach(self, namespace, activation_id, have)

    def generation_stream(self, run: Run, fn: Function, text: Choices) -> GenerationStream:
        """The relay of `run`'s generation (see _resume): a new run's, or a reconnect's."""
        return GenerationStream(
            config=self.config,
            invokers=self.invokers,
            dispatcher=self.dispatcher,
            metrics=self.metrics,
            run=run,
            fn=fn,
            text=text,
            refresh=lambda: self.function_for(run.namespace, run.function, fresh=True),
        )

    def cancel(self, namespace: str, activation_id: str) -> dict[str, Any]:
        """Stop a running generation now (see _attach.cancel)."""
        return attach.cancel(self.db, self.invokers, namespace, activation_id)

    def relaying(self, run: Run, gen: GenerationStream | None) -> None:
        """This process relays `run` now (migration requests reach it), or no longer."""
        if gen is None:
            self._live.pop(run.id, None)
        else:
            self._live[run.id] = gen

    def store(self, run: Run, slot: Slot | None) -> None:
        self._store(run, slot)

    def _released(self, slot: Slot) -> None:
        def release() -> None:
            with self.db.connect(write=True) as conn:
                self.dispatcher.release(conn, slot)

        _again_if_disconnected(release)

    def _mark_dispatched(self, run: Run, lease_until: float | None) -> bool:
        """Record in the stored activation that it reaches an invoker now (see _leases);
        False when this process no longer holds its lease."""
        assert run.start_at is not None and run.invoker is not None
        with self.db.connect(write=True) as conn:
            return mark_dispatched(
                conn, run.id, run.claim or "", run.start_at, run.invoker, lease_until
            )

    def _store(self, run: Run, slot: Slot | None) -> None:
        """Release the slot and write the activation, in one transaction."""
        if run.end_at is None:
            run.finish("platform_error", error=PlatformError("the invocation ended unexpectedly"))
        cols = run.columns()

        def replace() -> None:  # a reconnect's: the record the first process stored goes
            with self.db.connect(write=True) as conn:
                if slot is not None:
                    self.dispatcher.release(conn, slot)
                conn.execute(
                    update(_ACTIVATIONS)
                    .where(_ACTIVATIONS.c.id == run.id)
                    .values(**{k: v for k, v in cols.items() if k != "id"})
                )

        def write() -> None:
            if run.attached and run.persisted:
                replace()
                return
            try:
                self._write_outcome(cols, slot, run.claim, insert=not run.persisted)
            except IntegrityError:  # stored as running meanwhile (it outlived the blocking wait)
                if run.attached:  # its first process stored it meanwhile
                    replace()
                elif run.detached and slot is not None:  # a reconnect stored the rest first
                    self._released(slot)
                elif not run.detached:
                    self._write_outcome(cols, slot, run.claim, insert=False)

        _again_if_disconnected(write)
        self.metrics.observe_activation(run)

    def _write_outcome(
        self, cols: Mapping[str, Any], slot: Slot | None, claim: str | None, *, insert: bool
    ) -> None:
        if insert and slot is not None and self.db.dialect == "postgresql":
            # The common case in one statement (one round trip), prepared for the driver.
            keys = tuple(cols)
            prepared = self._prepared.get(keys)
            if prepared is None:
                prepared = self._prepared[keys] = self.db.prepare(
                    _release_and_insert(keys), write=True, durable=False
                )
            params = {
                f"a_{k}": json.dumps(v) if k in _JSON_COLUMNS and v is not None else v
                for k, v in cols.items()
            }
            prepared.run({**params, "instance": slot.instance_id, "now": time.time()})
            return
        with self.db.connect(write=True) as conn:
            if slot is not None:
                self.dispatcher.release(conn, slot)
            if insert:
                conn.execute(_ACTIVATIONS.insert(), cols)
            elif not finish(conn, cols, claim):
                log.warning(
                    "activation %s ended meanwhile (its lease expired): outcome %s not stored",
                    cols["id"],
                    cols["status"],
                )

    def _persist_running(self, run: Run, fn: Function) -> None:
        """Store a blocking invocation that outlived the blocking wait as running."""
        run.claim = new_claim(self.name)
        cols = {**run.columns(), "status": "running"}  # start_at: whether it was sent yet
        try:
            with self.db.session(write=True) as s:
                exists = s.execute(select(Activation.id).where(Activation.id == run.id)).scalar()
                if exists is None:
                    s.add(
                        Activation(
                            **cols,
                            claimed_by=run.claim,
                            lease_until=time.time() + fn.timeout_s + self.config.lease_margin,
                        )
                    )
            run.persisted = True
        except IntegrityError:
            if self._stored(run.id):
                return  # it finished and stored itself meanwhile
            raise _namespace_gone(run) from None
        # Sent between the snapshot above and `persisted`: execute() did not mark it then.
        # (One of the two threads sees the other's write; marking twice is harmless.)
        if cols["start_at"] is None and run.start_at is not None:
            self._mark_dispatched(run, None)

    def _stored(self, activation_id: str) -> bool:
        with self.db.session() as s:
            found = s.execute(select(Activation.id).where(Activation.id == activation_id))
            return found.scalar() is not None

    # ------------------------------------------------------------ activations
    def list_activations(
        self,
        namespace: str,
        *,
        name: str | None,
        since: float | None,
        upto: float | None,
        status: str | None,
        limit: int,
        skip: int,
    ) -> list[dict[str, Any]]:
        """A page of activations, newest first."""
        if status is not None and status not in STATUSES:
            raise InvalidRequest(f"'status' must be one of {list(STATUSES)}, got {status!r}")
        with self.db.session() as s:
            ns_id = self._namespace_id(s, namespace)
            q = select(Activation).where(Activation.namespace_id == ns_id)
            if name is not None:
                q = q.where(Activation.function_name == name)
            if since is not None:
                q = q.where(Activation.created_at >= since)
            if upto is not None:
                q = q.where(Activation.created_at <= upto)
            if status is not None:
                q = q.where(Activation.status == status)
            rows = s.execute(
                q.order_by(Activation.created_at.desc(), Activation.id).offset(skip).limit(limit)
            ).scalars()
            return [activation_json(r, namespace, full=False) for r in rows]

    def get_activation(self, namespace: str, activation_id: str) -> dict[str, Any]:
        """One activation with its request, result, error and logs."""
        with self.db.session() as s:
            ns_id = self._namespace_id(s, namespace)
            row = s.execute(
                select(Activation).where(
                    Activation.id == activation_id, Activation.namespace_id == ns_id
                )
            ).scalar_one_or_none()
            if row is None:
                raise NotFound(f"no activation {activation_id!r} in namespace {namespace!r}")
            return activation_json(row, namespace)

    # ------------------------------------------------------------ invokers
    def heartbeat(self, body: Any) -> dict[str, Any]:
        """An invoker's registration or heartbeat, with its status; reconciles its instances.

        Its state follows its drain (see _drain): "draining" in the body says it
        drains itself (SIGTERM); an admin's drain stands whatever it says.
        """
        doc = require_object(body)
        name, url, device = doc.get("name"), doc.get("url"), doc.get("device", "")
        status = doc.get("status") or {}
        capacity = doc.get("capacity") or {}
        if not is_invoker_name(name):
            raise InvalidRequest(f"'name' must be {INVOKER_NAME_RULE}; got {show_value(name)}")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InvalidRequest("'url' must be an http(s) URL")
        if not isinstance(status, Mapping) or not isinstance(capacity, Mapping):
            raise InvalidRequest("'status' and 'capacity' must be objects")
        try:
            reported = reported_drain(doc.get("draining"))
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="draining") from None
        now = time.time()
        with self.db.session(write=True) as s:
            row = s.execute(
                select(Invoker).where(Invoker.name == name).with_for_update()
            ).scalar_one_or_none()
            if row is None:
                row = Invoker(
                    name=name,
                    url=url.rstrip("/"),
                    device=str(device)[:64],
                    capacity=dict(capacity),
                    status={},
                    state="active",
                    registered_at=now,
                    last_heartbeat=now,
                )
                s.add(row)
                s.flush()
                log.info("invoker %s registered at %s", name, url)
            elif row.state == "lost":
                log.info("invoker %s is back", name)
            row.url, row.device = url.rstrip("/"), str(device)[:64]
            row.capacity, row.last_heartbeat = dict(capacity), now
            state = on_heartbeat(s, row, status, reported, now)
            orphans = self._reconcile(s, row, status)
            invoker_id, invoker_url = row.id, row.url
        for held in orphans:
            self._orphans.submit(invoker_id, invoker_url, held.function, held.instance)
        return {"name": name, "state": state, "heartbeat_timeout": self.config.heartbeat_timeout}

    def _reconcile(self, s: Session, invoker: Invoker, status: Mapping[str, Any]) -> list[Held]:
        """Forget the rows of instances `invoker` no longer holds; those it holds without one."""
        held = held_instances(status)
        decision = reconcile(
            instance_rows(s, invoker.id),
            held,
            stale_before=time.time() - 2 * self.config.heartbeat_timeout,
        )
        if decision.forget:
            s.execute(delete(Instance).where(Instance.id.in_(decision.forget)))
        return [held[key] for key in decision.unload]

    def list_invokers(self) -> list[dict[str, Any]]:
        """Every invoker with its state, last heartbeat, instances and drain progress."""
        return self.drains.list()

    def get_invoker(self, name: str) -> dict[str, Any]:
        """One invoker's document (NotFound when unknown)."""
        return self.drains.get(name)

    def drain_invoker(self, name: str, body: Any) -> dict[str, Any]:
        """Drain invoker `name` (admin): no new work; running generations move away or end
        (within `grace_s`), then its instances are unloaded. Its document."""
        return self.drains.drain(name, body)

    def undrain_invoker(self, name: str) -> dict[str, Any]:
        """Put invoker `name` back into placement (admin). Its document."""
        return self.drains.undrain(name)

    # ------------------------------------------------------------ background: queue
    def _queue_loop(self) -> None:
        while not self._stop.is_set():
            try:
                claimed = self._claim()
            except Exception:
                log.exception("claiming queued activations failed")
                claimed = 0
            if not claimed:
                self._wake.wait(0.25)
                self._wake.clear()

    def _claim(self) -> int:
        """Claim queued activations up to the free queue workers and start them."""
        free = 0
        while self._queue_slots.acquire(blocking=False):
            free += 1
        if not free:
            return 0
        try:
            with self.db.autocommit() as conn:  # a plain read first: no write lock when idle
                waiting = conn.execute(_ANY_QUEUED).first()
            if waiting is None:
                for _ in range(free):
                    self._queue_slots.release()
                return 0
            now = time.time()
            with self.db.session(write=True) as s:
                ids = list(
                    s.execute(
                        select(Activation.id)
                        .where(Activation.status == "queued")
                        .order_by(Activation.created_at)
                        .limit(free)
                        .with_for_update(skip_locked=True)
                    ).scalars()
                )
                rows = []
                for activation_id in ids:
                    row = s.execute(
                        select(Activation, Namespace.name, Function)
                        .join(Namespace, Namespace.id == Activation.namespace_id)
                        .outerjoin(
                            Function,
                            (Function.namespace_id == Activation.namespace_id)
                            & (Function.name == Activation.function_name),
                        )
                        .where(Activation.id == activation_id)
                    ).one()
                    act, ns, fn = row
                    timeout = fn.timeout_s if fn is not None else 0.0
                    act.status, act.claimed_by = "running", new_claim(self.name)
                    act.lease_until = now + timeout + self.config.lease_margin
                    act.attempts += 1
                    rows.append((Run.of(act, ns), fn))
        except Exception:
            for _ in range(free):
                self._queue_slots.release()
            raise
        for _ in range(free - len(rows)):
            self._queue_slots.release()
        for run, fn in rows:
            self._queue_pool.submit(self._run_queued, run, fn)
        return len(rows)

    def _run_queued(self, run: Run, fn: Function | None) -> None:
        try:
            if fn is None:
                run.finish(
                    "function_error",
                    error=NotFound(f"function {run.function!r} was deleted before it ran"),
                )
                self._store(run, None)
                return
            run.log(f"claimed by {self.name}")
            self._drain(run, fn)
        except Exception:
            log.exception("queued activation %s failed", run.id)
        finally:
            self._queue_slots.release()
            self._wake.set()

    # ------------------------------------------------------------ background: maintenance
    def migrate(self, namespace: str, activation_id: str, body: Any) -> dict[str, Any]:
        """Ask for a live migration of a running generation (see _moving); 202's body."""
        return self.moving.request(namespace, activation_id, parse_target(body), "api")

    def _migration_loop(self) -> None:
        """Take the migration requests naming the runs this process relays; start each."""
        while not self._stop.wait(MIGRATION_WATCH_S):
            live = dict(self._live)
            if not live:
                continue
            try:
                taken = self.moving.take(list(live))
            except SQLAlchemyError as exc:
                log.warning("migration requests not read: %s", exc)
                continue
            for activation_id, to, reason in taken:
                gen = live[activation_id]
                timeout = max(1.0, gen.fn.timeout_s)
                threading.Thread(
                    target=gen.migrate, args=(to, reason, timeout), daemon=True, name="sllm-move"
                ).start()

    def _maintenance_loop(self) -> None:
        while not self._stop.wait(self.config.maintenance_interval):
            try:
                self.maintain()
            except Exception:
                log.exception("maintenance pass failed")

    def maintain(self) -> None:
        """One pass: lost invokers, expired leases, keep-alive unloads, min instances."""
        now = time.time()
        with self.db.session(write=True) as s:
            lost = list(
                s.execute(
                    select(Invoker.id, Invoker.name).where(
                        Invoker.state != "lost",
                        Invoker.last_heartbeat < now - self.config.heartbeat_timeout,
                    )
                ).all()
            )
            for invoker_id, name in lost:
                log.warning("invoker %s missed its heartbeats: out of rotation", name)
                s.execute(
                    update(Invoker)
                    .where(Invoker.id == invoker_id)
                    .values(state="lost")
                    .execution_options(synchronize_session=False)
                )
                s.execute(delete(Instance).where(Instance.invoker_id == invoker_id))
            # A slot is held for at most its function's timeout. Counts on an instance untouched
            # for longer were leaked (a controller killed mid-request; on PostgreSQL, a release
            # lost with the database server's crash): give them back.
            s.execute(
                update(Instance)
                .where(
                    Instance.in_flight > 0,
                    Instance.last_used_at
                    < now
                    - self.config.lease_margin
                    - select(Function.timeout_s)
                    .where(Function.id == Instance.function_id)
                    .scalar_subquery(),
                )
                .values(in_flight=0)
                .execution_options(synchronize_session=False)
            )
            requeued, interrupted = expire(s.connection(), now)
        if requeued or interrupted:
            log.warning(
                "expired leases: %d activation(s) queued again (never sent), %d interrupted",
                requeued,
                interrupted,
            )
        if requeued:
            self._wake.set()
        self.drains.step_all()
        self._expire_idle(now)
        self._prewarm()
        self.metrics.observe_invokers(self.drains.counts())

    def _expire_idle(self, now: float) -> None:
        with self.db.session(write=True) as s:
            rows = s.execute(
                select(
                    Instance.id,
                    Instance.state,
                    Instance.function_id,
                    Function.min_instances,
                    Invoker.url,
                    Namespace.name,
                    Function.name,
                )
                .join(Function, Function.id == Instance.function_id)
                .join(Namespace, Namespace.id == Function.namespace_id)
                .join(Invoker, Invoker.id == Instance.invoker_id)
                .where(
                    (Instance.state == "unloading")
                    | (
                        (Instance.state == "ready")
                        & (Instance.in_flight == 0)
                        & (Instance.last_used_at < now - Function.keep_alive_s)
                    )
                )
            ).all()
            doomed = []
            for instance_id, state, function_id, min_instances, url, ns, fname in rows:
                if state == "ready":  # keep min_instances ready (counted now: earlier rows went)
                    live = s.execute(
                        select(func.count())
                        .select_from(Instance)
                        .where(Instance.function_id == function_id, Instance.state == "ready")
                    ).scalar_one()
                    if live <= min_instances:
                        continue
                taken = rowcount(
                    s.execute(
                        delete(Instance)
                        .where(Instance.id == instance_id, Instance.in_flight == 0)
                        .execution_options(synchronize_session=False)
                    )
                )
                if taken:
                    doomed.append((url, f"{ns}/{fname}", str(instance_id)))
        for url, function, instance in doomed:
            self._unload_on(url, function, instance)

    def _prewarm(self) -> None:
        now = time.time()
        with self.db.session() as s:
            short = list(
                s.execute(
                    select(Function, Namespace.name)
                    .join(Namespace, Namespace.id == Function.namespace_id)
                    .where(
                        or_(Function.load_retry_at.is_(None), Function.load_retry_at <= now),
                        Function.min_instances
                        > select(func.count())
                        .select_from(Instance)
                        .where(
                            Instance.function_id == Function.id,
                            Instance.state.in_(("loading", "ready")),
                        )
                        .scalar_subquery(),
                    )
                ).all()
            )
        for fn, ns in short:
            try:
                slot = self.dispatcher.scale_out(fn, reserve=False)
            except StaleFunction:
                continue  # changed since the read above: the next pass sees it
            if slot is not None:
                self._background.submit(self._load, slot, fn, ns)

    def _load(self, slot: Slot, fn: Function, namespace: str) -> None:
        """Prewarm: load an instance of `fn` into `slot`; any failure gives the slot back."""
        try:
            self._load_into(slot, fn, namespace)
        except Exception:  # on an executor thread: a bug would be lost in its future
            log.exception("prewarm of %s/%s on %s failed", namespace, fn.name, slot.invoker)
            try:
                self.dispatcher.drop(slot)
            except Exception:
                log.exception(
                    "prewarm of %s/%s: its slot could not be given back", namespace, fn.name
                )

    def _load_into(self, slot: Slot, fn: Function, namespace: str) -> None:
        body = instance_body(namespace, fn, slot)
        try:
            report = self.invokers.call(slot.url, "/v1/load", body, max(fn.timeout_s, 60.0))
        except (Overloaded, InvokerLost, Unavailable) as exc:
            # Not the function's fault: the next pass tries again, with no backoff or error shown.
            self.dispatcher.drop(slot)
            log.info("prewarm of %s on %s put off: %s", body["function"], slot.invoker, exc.message)
            return
        except SllmError as exc:
            self.dispatcher.drop(slot)
            with self.db.connect(write=True) as conn:
                wait = record_failure(conn, fn.id, fn.version, exc, time.time())
            log.warning(
                "prewarm of %s on %s failed (next try in %.0f s): %s",
                body["function"],
                slot.invoker,
                wait,
                exc.message,
            )
            return
        tier = report.get("tier") if report.get("cold") else None
        load_ms = float(report.get("load_seconds", 0.0)) * 1000
        self.dispatcher.loaded(slot, tier, load_ms)

    def _unload_on(
        self, url: str, function: str, instance: str | None = None, force: bool = False
    ) -> None:
        """Unload instance `instance` of `function` (without an id: its only instance there);
        `force`: even while requests run on it (they end with an error)."""
        body: dict[str, Any] = (
            {"function": function}
            if instance is None
            else {"instance": instance, "function": function}
        )
        if force:
            body["force"] = True
        try:
            self.invokers.call(url, "/v1/unload", body, 10.0)
        except SllmError as exc:
            log.info("unload of %s (instance %s) on %s: %s", function, instance, url, exc.message)

    # ------------------------------------------------------------ lookups
    @staticmethod
    def _namespace_id(s: Session, name: str) -> int:
        found = s.execute(select(Namespace.id).where(Namespace.name == name)).scalar()
        if found is None:
            raise NotFound(f"no namespace {name!r}")
        return int(found)

    @staticmethod
    def _function(s: Session, namespace: str, name: str) -> Function:
        row = s.execute(
            select(Function)
            .join(Namespace, Namespace.id == Function.namespace_id)
            .where(Namespace.name == namespace, Function.name == name)
        ).scalar_one_or_none()
        if row is None:
            raise NotFound(f"no function {name!r} in namespace {namespace!r}")
        return row


def _function_doc(row: Function, namespace: str) -> dict[str, Any]:
    """A function as the API shows it, with why it is not warm (`load_error`, or null)."""
    return {**function_json(row, namespace), "load_error": load_error_json(row)}


def _namespace_gone(run: Run) -> NotFound:
    """A run that cannot be stored: its namespace was deleted (the activation's key fails)."""
    return NotFound(f"no function {run.function!r} in namespace {run.namespace!r}")


def _check_payload(fn: Function, body_bytes: int) -> None:
    if body_bytes > fn.max_payload_bytes:
        raise PayloadTooLarge(
            f"the request is {body_bytes} bytes; function {fn.name!r} takes at most "
            f"{fn.max_payload_bytes}"
        )


def _again_if_disconnected(write: Callable[[], None]) -> None:
    """Run `write`; once more if its pooled connection turned out dead (the pool replaced it).

    For the writes that end a request: losing them would leak a slot and the record.
    """
    try:
        write()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        log.warning("database connection lost; writing again: %s", exc.orig)
        write()


@functools.cache
def _release_and_insert(keys: tuple[str, ...]) -> Insert:
    """PostgreSQL: give a slot back and insert an activation (columns `keys`) in one statement.

    Params: instance, now (the slot), a_<column> (the activation).
    """
    values: dict[str, Any] = {k: bindparam(f"a_{k}", type_=_ACTIVATIONS.c[k].type) for k in keys}
    for column in _ACTIVATIONS.c:  # defaults are not filled in for a statement built like this
        default = column.default
        if column.name not in values and isinstance(default, ScalarElementColumnDefault):
            values[column.name] = default.arg
    return insert(_ACTIVATIONS).values(values).add_cte(RELEASE.cte("released"))
