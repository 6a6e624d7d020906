"""Continuous batching on tiny models: a batch gives each sequence exactly what it gets alone,
streams join and leave between steps, long prompts are chunked, the KV budget preempts and
recomputes instead of failing, and sampling parameters stay per sequence."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sllm import tiny_models
from sllm.core.errors import InsufficientCapacity, Overloaded
from sllm.native_loader import convert, load_model
from sllm.runtime import Runtime, SamplingParams, load_tokenizer, model_class_for
from sllm.runtime._generation import Generation

ARCHS = ("llama", "opt", "gpt2", "qwen2")
PROMPTS = (
    "Hello world! The quick brown fox",
    "Tests",
    "Serverless inference loads model checkpoints on demand. The loader reads",
    "A checkpoint",
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Converted tiny models with wide weights (clear argmax winners), built once."""
    root = tmp_path_factory.mktemp("batching")
    out = {}
    for arch in ARCHS:
        src = tiny_models.build_tiny_model(arch, root / f"{arch}-src", init_std=0.5)
        out[arch] = root / arch
        convert(src, out[arch])
    return out


def runtime_for(folder: Path, **kw: Any) -> Runtime:
    model = load_model(folder, cls=model_class_for(folder, "generate"))
    kw.setdefault("concurrency", 8)
    return Runtime(model, load_tokenizer(folder), folder, **kw)


def drain(generation: Generation) -> list[int]:
    tokens = []
    with generation:
        while not generation.finished:
            event = generation.step(timeout=60)
            if event.token is not None:
                tokens.append(event.token)
    return tokens


def alone(rt: Runtime, prompt: list[int], params: SamplingParams) -> list[int]:
    return drain(rt.start(prompt, params))


class PassLog:
    """Records the shape of every batched forward pass of a runtime."""

    def __init__(self, rt: Runtime) -> None:
        self.passes: list[tuple[int, int]] = []  # (rows, tokens per row)
        engine = rt._engine
        original = engine.run

        def run(input_ids: torch.Tensor, *args: Any) -> torch.Tensor:
            self.passes.append((int(input_ids.shape[0]), int(input_ids.shape[1])))
            return original(input_ids, *args)

        engine.run = run  # type: ignore[method-assign]

    @property
    def decodes(self) -> list[int]:
        return [rows for rows, width in self.passes if width == 1]

    @property
    def prefills(self) -> list[int]:
        return [width for rows, width in self.passes if width > 1]


def arriving_together(rt: Runtime, prompts: list[list[int]], params: SamplingParams) -> list[Any]:
    """Start `prompts` while the batcher is held at a step boundary, so they all wait
    together and the next step sees them at once (a burst); their generations."""
    batcher = rt._batcher
    assert batcher is not None
    hold, holding = threading.Event(), threading.Event()
    blocker = threading.Thread(target=lambda: batcher.call(lambda: (holding.set(), hold.wait(30))))
    blocker.start()
    assert holding.wait(10)
    started: list[Any] = [None] * len(prompts)
    threads = [
        threading.Thread(target=lambda i=i: started.__setitem__(i, rt.start(prompts[i], params)))
        for i in range(len(prompts))
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(batcher._waiting) < len(prompts) and time.monotonic() < deadline:
        time.sleep(0.01)
    hold.set()
    for t in threads:
        t.join(30)
    blocker.join(30)
    return started


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_output_equals_each_request_alone(
    folders: dict[str, Path], arch: str
) -> None:
    rt = runtime_for(folders[arch])
    serial = runtime_for(folders[arch], batching=False)
    assert rt.batching and not serial.batching
    params = SamplingParams(max_tokens=20, temperature=0.0)
    prompts = [rt.encode(prompt=p) for p in PROMPTS]
    expected = [alone(serial, p, params) for p in prompts]

    # Two start together; two more join while they decode; all finish in one batch.
    first = [rt.start(p, params) for p in prompts[:2]]
    head = first[0].step(timeout=60).token
    later = [rt.start(p, params) for p in prompts[2:]]
    got = [drain(g) for g in first + later]
    got[0].insert(0, head)

    assert got == expected
    assert [alone(rt, p, params) for p in prompts] == expected
    assert rt.active() == 0


def test_concurrent_streams_advance_in_shared_passes(folders: dict[str, Path]) -> None:
    rt = runtime_for(folders["llama"])
    log = PassLog(rt)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    prompt = rt.encode(prompt=PROMPTS[0])
    barrier = threading.Barrier(4)
    results: dict[int, list[int]] = {}

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = drain(rt.start(prompt, params))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert len({tuple(r) for r in results.values()}) == 1
    assert sum(log.decodes) == 4 * 16  # every token of every stream, one row each
    assert len(log.decodes) < 2 * 16  # but in shared passes, not one pass per token
    assert max(log.decodes) > 1


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(
    folders: dict[str, Path],
) -> None:
    rt = runtime_for(folders["llama"], prefill_chunk=8)
    params = SamplingParams(max_tokens=30, temperature=0.0)
    short = rt.encode(prompt="Tests")
    long_prompt = rt.encode(prompt=" ".join([PROMPTS[2]] * 3))[:60]
    expected = alone(rt, long_prompt, SamplingParams(max_tokens=5, temperature=0.0))
    log = PassLog(rt)

    running = rt.start(short, params)
    running.step(timeout=0.5)
    joined = drain(rt.start(long_prompt, SamplingParams(max_tokens=5, temperature=0.0)))
    drain(running)

    assert joined == expected
    assert max(log.prefills) <= 8
    # While the long prompt was prefilled chunk by chunk, the running stream kept decoding.
    chunks = [i for i, (rows, width) in enumerate(log.passes) if width > 1]
    between = [
        log.passes[i]
        for i in range(chunks[0], chunks[-1])
        if log.passes[i][1] == 1  # a decode pass
    ]
    assert len(chunks) >= 5 and len(between) >= len(chunks) - 1


def test_a_full_kv_budget_preempts_and_recomputes_never_fails(folders: dict[str, Path]) -> None:
    probe = runtime_for(folders["llama"])
    assert probe._batcher is not None
    token_bytes = sum(2 * s.heads * s.head_dim * 4 for s in probe._batcher.probe())
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=3)
    prompt = probe.encode(prompt=PROMPTS[0])[:10]
    expected = [alone(probe, prompt, SamplingParams(max_tokens=40, seed=3 + i)) for i in range(3)]
    # Room for about two whole generations at once, not three.
    longest = len(prompt) + params.max_tokens
    rt = runtime_for(folders["llama"], kv_cache_bytes=2 * longest * token_bytes + token_bytes)

    # All three fit while short; as they grow, one must give way to the others.
    got = [drain(g) for g in rt.start_many(prompt, params, 3)]

    assert got == expected, ([len(g) for g in got], token_bytes, rt.kv_cache_bytes)
    assert rt._batcher is not None and rt._batcher.preemptions > 0, [len(g) for g in got]
    assert rt.active() == 0


def test_when_the_budget_is_full_a_new_request_waits_then_gets_429(
    folders: dict[str, Path],
) -> None:
    probe = runtime_for(folders["llama"])
    assert probe._batcher is not None
    token_bytes = sum(2 * s.heads * s.head_dim * 4 for s in probe._batcher.probe())
    rt = runtime_for(folders["llama"], kv_cache_bytes=110 * token_bytes, queue_timeout=0.3)
    prompt = rt.encode(prompt=PROMPTS[0])[:20]
    # A held migration target of 100 tokens fills the budget; it decodes nothing.
    state = {"tokens": [5] * 100, "prompt_len": 90, "params": {"max_tokens": 20}}
    held = rt.resume(state, hold=True)

    with pytest.raises(Overloaded) as info:
        rt.start(prompt, SamplingParams(max_tokens=5, temperature=0.0))

    assert info.value.status == 429 and info.value.retry_after == 1.0
    assert held.state == "held"
    held.close()
    assert len(drain(rt.start(prompt, SamplingParams(max_tokens=5, temperature=0.0)))) == 5


def test_a_generation_larger_than_the_whole_budget_is_refused(folders: dict[str, Path]) -> None:
    rt = runtime_for(folders["llama"], kv_cache_bytes=1024)
    with pytest.raises(InsufficientCapacity, match="KV cache"):
        rt.start(rt.encode(prompt=PROMPTS[0]), SamplingParams(max_tokens=50))
    assert rt.active() == 0


def test_sampling_parameters_are_per_sequence_in_a_mixed_batch(folders: dict[str, Path]) -> None:
    rt = runtime_for(folders["qwen2"], concurrency=16)
    prompt = rt.encode(prompt=PROMPTS[0])
    mix = [
        SamplingParams(max_tokens=24, temperature=0.0),
        SamplingParams(max_tokens=24, temperature=1.0, seed=7),
        SamplingParams(max_tokens=24, temperature=0.7, top_k=5, seed=8),
        SamplingParams(max_tokens=24, temperature=1.0, top_p=0.5, seed=9),
        SamplingParams(max_tokens=5, temperature=1.0, seed=10),
        SamplingParams(max_tokens=24, temperature=0.0, presence_penalty=1.5, logprobs=3),
        SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=1.8),
        SamplingParams(max_tokens=24, temperature=0.0, logit_bias=((7, 100.0),)),
        SamplingParams(max_tokens=24, temperature=1.0, min_p=0.2, frequency_penalty=1.0, seed=11),
    ]
    expected = [alone(rt, prompt, p) for p in mix]

    generations = [rt.start(prompt, p) for p in mix]
    got = [drain(g) for g in generations]

    assert got == expected
    assert len({tuple(t) for t in got}) == len(mix)  # each asked for something else
    assert len(got[4]) == 5
    assert set(got[7]) == {7}  # a +100 bias wins every step


def test_stop_strings_are_per_sequence(folders: dict[str, Path]) -> None:
    rt = runtime_for(folders["llama"])
    prompt = rt.encode(prompt=PROMPTS[0])
    free = rt.start(prompt, SamplingParams(max_tokens=20, temperature=0.0))
    text = ""
    with free:
        while not free.finished:
            text += free.step(timeout=60).text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()

    stopped = rt.start(prompt, SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,)))
    other = rt.start(prompt, SamplingParams(max_tokens=20, temperature=0.0))
    events = []
    with stopped:
        while not stopped.finished:
            events.append(stopped.step(timeout=60))
    assert events[-1].finish_reason == "stop" and events[-1].stop_reason == stop
    assert "".join(e.text for e in events) == text[: text.index(stop)]
    assert len(drain(other)) == 20


def test_n_choices_share_one_prefill_and_sample_apart(folders: dict[str, Path]) -> None:
    rt = runtime_for(folders["llama"])
    prompt = rt.encode(prompt=PROMPTS[2])
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=42)
    log = PassLog(rt)

    choices = rt.start_many(prompt, params, 3, gen_id="act")

    got = [drain(g) for g in choices]
    assert [g.id for g in choices] == ["act.0", "act.1", "act.2"]
    assert len(log.prefills) == 1  # one prefill for the three choices
    assert len({tuple(t) for t in got}) == 3
    for i, tokens in enumerate(got):  # choice i samples as a request seeded seed + i would
        assert tokens == alone(rt, prompt, SamplingParams(max_tokens=12, seed=42 + i))


def test_a_cancelled_stream_leaves_and_the_others_go_on(folders: dict[str, Path]) -> None:
    rt = runtime_for(folders["llama"])
    params = SamplingParams(max_tokens=40, temperature=0.0)
    prompt = rt.encode(prompt=PROMPTS[0])
    expected = alone(rt, prompt, params)
    keep, cancel = rt.start(prompt, params), rt.start(prompt, params)
    cancel.step(timeout=60)

    cancel.close()

    assert cancel.state in ("cancelled", "running")  # it leaves at the next step boundary
    assert drain(keep) == expected
    assert cancel.state == "cancelled" and rt.active() == 0


def test_a_row_that_leaves_from_the_middle_of_the_batch_keeps_the_others_intact(
    folders: dict[str, Path],
) -> None:
    """Commands (cancel, pause, continue) run between steps and move KV rows: two held
    migration targets in rows 0 and 1, row 0 cancelled, and row 1's cache moves up whole."""
    rt = runtime_for(folders["llama"])
    params = SamplingParams(max_tokens=12, temperature=0.0)
    prompt = rt.encode(prompt=PROMPTS[0])
    expected = alone(rt, prompt, params)
    state = {"tokens": prompt, "prompt_len": len(prompt), "params": params.to_json()}
    first, second = rt.resume(state, hold=True), rt.resume(state, hold=True)
    assert first.wait_prefilled(30) and second.wait_prefilled(30)
    assert rt.kv_rows() == 2

    first.close()

    deadline = time.monotonic() + 10
    while rt.kv_rows() != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt.kv_rows() == 1
    assert second.load_state(state) == len(prompt) - 1  # its cached prompt is reused
    assert drain(second) == expected


def test_sliding_window_models_fall_back_to_serial_generation(tmp_path: Path) -> None:
    src = tiny_models.build_tiny_model("qwen2", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=16, max_window_layers=0)
    config.pop("layer_types", None)  # derived again from the sliding-window fields
    (src / "config.json").write_text(json.dumps(config))
    convert(src, tmp_path / "qwen2")
    rt = runtime_for(tmp_path / "qwen2")
    assert not rt.batching
    tokens = alone(rt, rt.encode(prompt="Tests"), SamplingParams(max_tokens=4, temperature=0))
    assert len(tokens) == 4


def test_the_kv_cache_grows_by_doubling_and_is_kept_a_while_when_idle(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sllm.runtime import _batch

    rt = runtime_for(folders["llama"])
    batcher = rt._batcher
    assert batcher is not None
    reallocations: list[tuple[int, int]] = []
    kv = batcher._cache()
    real = kv._reallocate

    def counted(rows: int, capacity: int) -> None:
        reallocations.append((rows, capacity))
        real(rows, capacity)

    monkeypatch.setattr(kv, "_reallocate", counted)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    prompt = rt.encode(prompt=PROMPTS[0])
    long = SamplingParams(max_tokens=40, temperature=0.0)  # all five run at once
    generations = [rt.start(prompt, long) for _ in range(5)]
    for g in generations:
        drain(g)

    # Five rows joined: the row count doubled (1, 2, 4, 8), it never grew one by one.
    assert sorted({rows for rows, _ in reallocations}) == [1, 2, 4, 8]
    # Idle: the cache stays for the next burst, which reuses it without reallocating...
    assert kv.rows == 8
    before = len(reallocations)
    drain(rt.start(prompt, params))
    assert len(reallocations) == before
    # ...and goes back once the instance has been idle for IDLE_RELEASE seconds.
    monkeypatch.setattr(_batch, "IDLE_RELEASE", 0.2)
    batcher.post(lambda: None)  # wake the loop so it waits again with the short timeout
    deadline = time.monotonic() + 10
    while kv.rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kv.rows == 0 and kv.allocated_bytes == 0
    assert drain(rt.start(prompt, params)) == drain(rt.start(prompt, params))


def test_a_burst_of_arrivals_is_prefilled_in_one_pass_beyond_the_chunk(
    folders: dict[str, Path],
) -> None:
    rt = runtime_for(folders["llama"], prefill_chunk=8)
    batcher = rt._batcher
    assert batcher is not None
    params = SamplingParams(max_tokens=12, temperature=0.0)
    text = " ".join(PROMPTS)
    prompts = [rt.encode(prompt=text[i:])[:8] for i in range(4)]
    assert all(len(p) == 8 for p in prompts)
    expected = [alone(rt, p, params) for p in prompts]
    running = rt.start(rt.encode(prompt="Tests"), SamplingParams(max_tokens=40, temperature=0.0))
    running.step(timeout=5)  # it decodes
    log = PassLog(rt)

    started = arriving_together(rt, prompts, params)
    got = [drain(g) for g in started]
    drain(running)

    assert got == expected
    # Four waiting against one decoding: one pass took all four prompts (4 x 7 tokens,
    # beyond the 8-token chunk), not four chunked passes between decode steps.
    first = next((rows, width) for rows, width in log.passes if width > 1)
    assert first[0] == 4 and first[0] * first[1] > 8
    assert len(log.prefills) == 1


def test_prefill_passes_group_chunks_of_like_length() -> None:
    from sllm.runtime._batch import pad_groups

    counts = [1, 501, 84, 410, 9, 77, 18, 6]
    groups = pad_groups(counts)
    assert [[counts[i] for i in g] for g in groups] == [[501, 410], [84, 77, 18], [9, 6, 1]]
    assert sorted(i for g in groups for i in g) == list(range(len(counts)))
    assert pad_groups([64] * 16) == [list(range(16))]  # equal chunks: one pass
    assert pad_groups([3, 2, 1]) == [[0, 1, 2]]  # padding below an extra pass's cost
    assert pad_groups([]) == []


def test_a_long_and_short_prompts_arriving_together_are_not_padded_to_one_length(
    folders: dict[str, Path],
) -> None:
    rt = runtime_for(folders["llama"], prefill_chunk=128)
    batcher = rt._batcher
    assert batcher is not None
    params = SamplingParams(max_tokens=6, temperature=0.0)
    text = " ".join(PROMPTS * 8)
    long_prompt = rt.encode(prompt=text)[:101]
    shorts = [rt.encode(prompt=p)[:3] for p in PROMPTS[:3]]
    assert len(long_prompt) == 101 and all(len(s) == 3 for s in shorts)
    prompts = [shorts[0], long_prompt, shorts[1], shorts[2]]
    expected = [alone(rt, p, params) for p in prompts]
    log = PassLog(rt)

    started = arriving_together(rt, prompts, params)

    assert [drain(g) for g in started] == expected
    # Two passes: the long prompt alone (100 tokens), the three short ones together (3 x 2),
    # not one pass of 4 x 100 tokens.
    assert sorted(p for p in log.passes if p[1] > 1) == [(1, 100), (3, 2)]


def test_a_process_with_an_idle_batcher_exits_cleanly(folders: dict[str, Path]) -> None:
    """Idle loops wait with a timeout (IDLE_RELEASE); without stopping them at exit, this
    process aborted while the interpreter finalized (status 134, "terminate called without
    an active exception"), as a pytest run of this file did."""
    import subprocess
    import sys

    script = f"""
import time
from sllm.native_loader import load_model
from sllm.runtime import Runtime, SamplingParams, load_tokenizer, model_class_for
from sllm.runtime import _batch
folder = {str(folders["llama"])!r}
def drain(g):
    with g:
        while not g.finished:
            g.step(timeout=30)
runtimes = []
for _ in range(3):  # loops left idle with their caches, waiting with a timeout
    rt = Runtime(load_model(folder, cls=model_class_for(folder, "generate")),
                 load_tokenizer(folder), folder, concurrency=8)
    runtimes.append(rt)
    prompt = rt.encode(prompt="hello there")
    for g in [rt.start(prompt, SamplingParams(max_tokens=40, temperature=0.0)) for _ in range(5)]:
        drain(g)
_batch.IDLE_RELEASE = 0.2
runtimes[0]._batcher.post(lambda: None)
time.sleep(0.5)
_batch.IDLE_RELEASE = 10.0
drain(runtimes[0].start(prompt, SamplingParams(max_tokens=4, temperature=0.0)))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_a_continued_migration_target_yields_its_first_token_from_the_recompute_pass(
    folders: dict[str, Path], temperature: float
) -> None:
    """The final round's few tokens and the next token come from one pass (the client's
    pause at the switch), and the output is the unmigrated one."""
    rt = runtime_for(folders["llama"])
    params = SamplingParams(max_tokens=12, temperature=temperature, seed=7, ignore_eos=True)
    prompt = rt.encode(prompt=PROMPTS[0])
    expected = alone(rt, prompt, params)
    held_state = {"tokens": prompt + expected[:3], "prompt_len": len(prompt)}
    held = rt.resume({**held_state, "params": params.to_json(), "sampler": {"seed": 7}}, hold=True)
    assert held.wait_prefilled(30)
    log = PassLog(rt)
    final = {
        "tokens": prompt + expected[:6],  # the source made 3 more since the round
        "prompt_len": len(prompt),
        "params": params.to_json(),
        "sampler": {"seed": 7},
    }
    assert held.load_state(final) == len(prompt) + 2  # all but the round's last token
    first = held.step(timeout=30)
    assert first.token == expected[6] and first.index == 7
    # The first pass computes 3 new tokens and the round's last, and yields the next token
    # (before, a 3-token prefill pass and then a decode pass); decoding goes on after it.
    assert log.passes[0] == (1, 4)
    assert [first.token, *drain(held)] == expected[6:]
