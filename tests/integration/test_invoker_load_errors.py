"""A model that cannot be loaded answers with the error a client can act on, never a 500.

In-process invoker (CPU, a folder store) behind its Flask app: a checkpoint that disagrees
with its config.json is the function's fault (502 function_error naming the tensor or
field); a published object truncated in the store is corrupt (502 corrupt_object), not a
store outage a client would retry (503 store_unavailable).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from sllm.invoker import Invoker, InvokerConfig, create_app
from sllm.store import Store, open_store, push_model, read_published
from sllm.tiny_models import build_tiny_model

TOKEN = "t"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FlaskClient, Store, Path]]:
    root = tmp_path_factory.mktemp("invoker")
    uri = f"file://{root / 'store'}"
    config = InvokerConfig(
        token=TOKEN,
        cache_dir=root / "cache",
        store_uri=uri,
        device="cpu",
        measure_bandwidth=False,
    )
    invoker = Invoker(config)
    invoker.start()
    try:
        yield create_app(invoker).test_client(), open_store(uri), root
    finally:
        invoker.close()


def _publish(store: Store, root: Path, name: str, edit: Callable[[dict[str, Any]], str]) -> None:
    src = build_tiny_model("llama", root / f"hf-{name}")
    config = src / "config.json"
    config.write_text(edit(json.loads(config.read_text())))
    push_model(str(src), name, store, progress=False)


def _load(client: FlaskClient, model: str) -> tuple[int, dict[str, Any]]:
    r = client.post(
        "/v1/load",
        json={"function": f"t/{model}", "model": model},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    return r.status_code, r.get_json()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: json.dumps({**c, "intermediate_size": 2 * c["intermediate_size"]}),
            r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape",
        ),
        (
            lambda c: json.dumps({**c, "hidden_size": "@"}).replace('"@"', "1e400"),
            r"'hidden_size' is inf",
        ),
    ],
    ids=["tensor-shapes", "config-1e400"],
)
def test_a_checkpoint_that_disagrees_with_its_config_is_a_function_error(
    setup: tuple[FlaskClient, Store, Path],
    edit: Callable[[dict[str, Any]], str],
    message: str,
    request: pytest.FixtureRequest,
) -> None:
    client, store, root = setup
    name = f"bad-{request.node.callspec.id}"
    _publish(store, root, name, edit)
    status, doc = _load(client, name)
    assert status == 502, doc
    assert doc["error"]["code"] == "function_error"
    assert re.search(message, doc["error"]["message"]), doc


def test_an_object_truncated_in_the_store_after_push_is_corrupt(
    setup: tuple[FlaskClient, Store, Path],
) -> None:
    client, store, root = setup
    _publish(store, root, "cut", json.dumps)
    model = read_published(store, "cut")
    key = model.prefix + "data.0"
    store.put_bytes(key, store.get_bytes(key)[:1000])
    status, doc = _load(client, "cut")
    assert status == 502, doc
    assert doc["error"]["code"] == "corrupt_object"
    assert "data.0 in the store is shorter" in doc["error"]["message"]
