"""Is a model published? The controller's look into the object store, when it knows it.

A function naming a model that is not in the store would fail only at its first
invocation, on an invoker; creating it fails at once instead (404 naming the
store). A controller without a store URI (SLLM_STORE_URI) cannot tell, and
accepts any well-formed name as before.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from sllm.core.errors import InvalidRequest, NotFound, SllmError, StoreError

if TYPE_CHECKING:
    from sllm.store import Store, StoreSettings

log = logging.getLogger(__name__)


class Catalog:
    """The published models of one store, looked up on demand."""

    def __init__(self, uri: str, settings: StoreSettings | None) -> None:
        self.uri = uri
        self.settings = settings
        self._store: Store | None = None
        self._lock = threading.Lock()

    def require(self, model: str) -> None:
        """NotFound when `model` is not published; a store that cannot answer lets it pass."""
        from sllm.store import read_published  # the store client only when a store is set

        try:
            store = self._open()
        except SllmError as exc:
            log.warning("cannot open the store %s to check models: %s", self.uri, exc.message)
            return
        try:
            read_published(store, model)
        except NotFound as exc:
            raise NotFound(f"{exc.message}; publish it first with `sllm model push`") from None
        except InvalidRequest:
            return  # a malformed name: the definition's own validation says what is wrong
        except StoreError as exc:
            log.warning("cannot check that model %r is published: %s", model, exc.message)

    def _open(self) -> Store:
        from sllm.store import open_store

        with self._lock:
            if self._store is None:
                self._store = open_store(self.uri, self.settings)
            return self._store
