"""Embedding micro-batches: concurrent callers share forward passes and get exactly their vectors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sllm import tiny_models
from sllm.core.errors import ContextLengthExceeded, FunctionError
from sllm.native_loader import convert, load_model
from sllm.runtime import Runtime, load_tokenizer, model_class_for
from sllm.runtime._embed_batch import EmbedBatcher, right_padded

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "café ☕",
    "A checkpoint is a set of tensors stored on disk.",
    "Good morning.",
    "Batching many requests together improves throughput.",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embed-batch")
    src = tiny_models.build_tiny_embedder(root / "src", pooling="mean", normalize=True)
    convert(src, root / "dst")
    return root / "dst"


def runtime_for(folder: Path, concurrency: int = 8) -> Runtime:
    model = load_model(folder, cls=model_class_for(folder, "embed"))
    return Runtime(model, load_tokenizer(folder), folder, task="embed", concurrency=concurrency)


def when_queued(batcher: EmbedBatcher, waiting: int, forward: Callable[..., Any]) -> Any:
    """A forward pass that, the first time, holds until `waiting` more calls are queued."""
    first = threading.Event()

    def slow(*args: Any) -> Any:
        if not first.is_set():
            first.set()
            deadline = time.monotonic() + 10
            while len(batcher._queue) < waiting and time.monotonic() < deadline:
                time.sleep(0.005)
        return forward(*args)

    return slow


def run_concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    def one(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_callers_get_their_own_vectors_from_fewer_passes(folder: Path) -> None:
    rt = runtime_for(folder)
    alone = [rt.embed([text])[0][0] for text in TEXTS]
    requests = [[TEXTS[0]], [TEXTS[1], TEXTS[2]], [TEXTS[3]], [TEXTS[4], TEXTS[5]]]
    passes_before = rt._embedder.passes
    engine = rt._engine
    engine.hidden_states = when_queued(rt._embedder, len(requests) - 1, engine.hidden_states)  # type: ignore[method-assign]

    results = run_concurrently([lambda r=r: rt.embed(r) for r in requests])

    got = [v for vectors, _ in results for v in vectors]
    expected = [alone[TEXTS.index(t)] for r in requests for t in r]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=0)
    assert [used for _, used in results] == [
        sum(len(rt.tokenizer(t)["input_ids"]) for t in r) for r in requests
    ]
    assert rt._embedder.passes - passes_before == 2  # the first alone, the other three together
    assert rt.active() == 0


def test_a_too_long_input_fails_only_its_own_caller(folder: Path) -> None:
    rt = runtime_for(folder)
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)

    results = run_concurrently([lambda: rt.embed([TEXTS[0]]), lambda: rt.embed(["hi", long])])

    assert isinstance(results[1], ContextLengthExceeded) and results[1].param == "input"
    vectors, _ = results[0]
    alone, _ = rt.embed([TEXTS[0]])
    torch.testing.assert_close(torch.tensor(vectors), torch.tensor(alone), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the batcher alone
def rows_forward(log: list[int]) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """A fake pooled forward: each row's vector is [sum of its tokens, its length]."""

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        log.append(batch["input_ids"].shape[0])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return torch.stack([(ids * mask).sum(1), mask.sum(1)], dim=1).float()

    return forward


def test_right_padding() -> None:
    b = right_padded([[5, 6], [7]], 0)

    assert b["input_ids"].tolist() == [[5, 6], [7, 0]]
    assert b["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_a_lone_call_runs_at_once() -> None:
    log: list[int] = []
    batcher = EmbedBatcher(rows_forward(log))

    assert batcher.embed([[1, 2], [3]], pad_id=0) == [[3.0, 2.0], [3.0, 1.0]]
    assert log == [2]


def in_order(batcher: EmbedBatcher, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run `calls` on threads started one by one, each once the one before it is queued."""
    results: list[Any] = [None] * len(calls)
    threads = []
    for i, call in enumerate(calls):
        t = threading.Thread(target=lambda i=i, call=call: results.__setitem__(i, call()))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
            batcher._busy if i == 0 else len(batcher._queue) == i
        ):
            time.sleep(0.002)
    for t in threads:
        t.join(30)
    return results


@pytest.mark.parametrize(
    ("max_inputs", "max_cells", "rows_per_pass"),
    [(256, 10_000, [1, 4]), (3, 10_000, [1, 3, 1]), (256, 8, [1, 2, 2])],
    ids=["the-rest-together", "input-bound", "padded-token-bound"],
)
def test_queued_calls_run_together_within_the_bounds(
    max_inputs: int, max_cells: int, rows_per_pass: list[int]
) -> None:
    log: list[int] = []
    batcher = EmbedBatcher(rows_forward(log), max_inputs=max_inputs, max_cells=max_cells)
    batcher._forward = when_queued(batcher, 3, batcher._forward)
    calls = [[[1]], [[2, 2], [3]], [[4, 4, 4]], [[5]]]

    results = in_order(batcher, [lambda c=c: batcher.embed(c, 0) for c in calls])

    assert results == [
        [[1.0, 1.0]],
        [[4.0, 2.0], [3.0, 1.0]],
        [[12.0, 3.0]],
        [[5.0, 1.0]],
    ]
    assert log == rows_per_pass


def test_a_failed_pass_fails_its_callers_and_the_next_calls_still_run() -> None:
    log: list[int] = []
    good = rows_forward(log)
    batcher = EmbedBatcher(good)
    batcher._forward = lambda b: (_ for _ in ()).throw(FunctionError("boom"))

    with pytest.raises(FunctionError, match="boom"):
        batcher.embed([[1]], 0)
    batcher._forward = good
    assert batcher.embed([[2]], 0) == [[2.0, 1.0]]
