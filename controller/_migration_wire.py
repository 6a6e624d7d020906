"""The invoker calls of one live migration, over the controller's invoker client.

    state    GET  {S}/v1/generations/{id}              the exported state ("generation")
    hold     POST {D}/v1/generations  {..., "state", "choice", "hold": true, "resumable": true}
             -> D's event stream: "start" at once, tokens only after "resume"
    prefill  POST {D}/v1/generations/{id}/prefill   {"tokens"}  -> {"cached"} once computed
    pause    POST {S}/v1/generations/{id}/pause                 -> {"generation": final state}
    resume   POST {D}/v1/generations/{id}/continue  {"state"}   -> {"recomputed"}
    cancel   DELETE {D}/v1/generations/{id}                        (an aborted migration)

`base` is the body that names D's instance (function, model, task, instance, version,
activation), as the dispatcher built it for D's slot.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote

from sllm.core.errors import PlatformError

from ._invokers import InvokerClient


class InvokerWire:
    """`controller._migration.Wire` over HTTP; every call bounded by `timeout` seconds."""

    def __init__(self, client: InvokerClient, base: Mapping[str, Any], timeout: float) -> None:
        self.client = client
        self.base = dict(base)
        self.timeout = timeout

    def state(self, url: str, gen_id: str) -> dict[str, Any]:
        _, raw = self.client.get(url, f"/v1/generations/{quote(gen_id)}", self.timeout)
        return _generation(json.loads(raw))

    def hold(self, url: str, state: dict[str, Any], choice: int) -> Iterator[dict[str, Any]]:
        body = {**self.base, "state": state, "choice": choice, "hold": True, "resumable": True}
        events = self.client.stream(url, body, self.timeout, path="/v1/generations")
        first = next(events, None)  # D has the instance and the held copy once "start" comes
        if first is None or first.get("event") != "start":
            events.close()
            raise PlatformError(f"invoker {url} did not start the held generation: {first}")
        return events

    def prefill(self, url: str, gen_id: str, tokens: list[int]) -> int:
        path = f"/v1/generations/{quote(gen_id)}/prefill"
        answer = self.client.call(url, path, {"tokens": tokens}, self.timeout)
        return int(answer["cached"])

    def pause(self, url: str, gen_id: str) -> dict[str, Any]:
        answer = self.client.call(url, f"/v1/generations/{quote(gen_id)}/pause", {}, self.timeout)
        return _generation(answer)

    def resume(self, url: str, gen_id: str, state: dict[str, Any]) -> int:
        path = f"/v1/generations/{quote(gen_id)}/continue"
        answer = self.client.call(url, path, {"state": state}, self.timeout)
        return int(answer.get("recomputed", 0))

    def cancel(self, url: str, gen_id: str) -> None:
        self.client.cancel(url, quote(gen_id), self.timeout)


def _generation(doc: Any) -> dict[str, Any]:
    state = doc.get("generation") if isinstance(doc, dict) else None
    if not isinstance(state, dict):
        raise PlatformError(f"an invoker answered without a generation state: {doc!r:.200}")
    return state
