"""Generation on tiny models: greedy equals transformers' generate, streams stop where a user
expects (eos, max_tokens, stop strings), text is released correctly, generations resume on
another runtime exactly, and concurrent requests share one instance safely."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import Cache, PretrainedConfig

from sllm import tiny_models
from sllm.core.errors import (
    Conflict,
    ContextLengthExceeded,
    InvalidRequest,
    Overloaded,
    Unavailable,
)
from sllm.native_loader import convert, load_model
from sllm.runtime import (
    Generation,
    Runtime,
    SamplingParams,
    TokenEvent,
    load_tokenizer,
    model_class_for,
)

PROMPT = "Hello world! The quick brown fox"
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
SAMPLED = SamplingParams(max_tokens=12, temperature=0.8, seed=1234)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Converted tiny models, built once for the module."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ("llama", "opt", "gpt2", "qwen2"):
        src = tiny_models.build_tiny_model(arch, root / f"{arch}-src")
        out[arch] = root / arch
        convert(src, out[arch])
    return out


def runtime_for(folder: Path, **kw: Any) -> Runtime:
    model = load_model(folder, cls=model_class_for(folder, "generate"))
    return Runtime(model, load_tokenizer(folder), folder, **kw)


@pytest.fixture(scope="module")
def llama(folders: dict[str, Path]) -> Runtime:
    return runtime_for(folders["llama"], concurrency=8)


def run(generation: Generation) -> list[TokenEvent]:
    events = []
    with generation:
        while not generation.finished:
            events.append(generation.step())
    return events


# -- greedy decoding against transformers -------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "qwen2"])
def test_greedy_output_equals_transformers_generate(folders: dict[str, Path], arch: str) -> None:
    folder = folders[arch]
    model = load_model(folder, cls=model_class_for(folder, "generate"))
    rt = Runtime(model, load_tokenizer(folder), folder)
    prompt = rt.encode(prompt=PROMPT)
    params = SamplingParams(max_tokens=24, temperature=0.0)

    events = list(rt.generate(prompt, params))

    hf = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    expected = hf[0, len(prompt) :].tolist()
    assert [e.token for e in events] == expected
    assert [e.index for e in events] == list(range(1, 25))
    text = rt.tokenizer.decode(expected, skip_special_tokens=True)
    assert "".join(e.text for e in events) == text
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert not any(e.finished for e in events[:-1])


def test_max_tokens_bounds_the_output(llama: Runtime) -> None:
    prompt = llama.encode(prompt=PROMPT)

    for max_tokens in (1, 5):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)  # eos may come first
        events = list(llama.generate(prompt, params))
        assert len(events) == max_tokens
        assert events[-1].finish_reason == "length"


def test_step_after_the_end_reports_finished_without_a_token(llama: Runtime) -> None:
    generation = llama.start(
        llama.encode(prompt=PROMPT), SamplingParams(max_tokens=2, ignore_eos=True)
    )
    run_events = [generation.step(), generation.step()]

    after = generation.step()

    assert run_events[-1].finished
    assert after == TokenEvent(None, "", 2, True, "length")
    assert len(generation.tokens) == generation.prompt_len + 2
    generation.close()


# -- sampling reproducibility ---------------------------------------------------------------


def test_same_seed_gives_same_tokens_and_other_seeds_differ(llama: Runtime) -> None:
    prompt = llama.encode(prompt=PROMPT)

    def tokens(seed: int | None) -> list[int | None]:
        params = SamplingParams(max_tokens=16, temperature=0.8, seed=seed)
        return [e.token for e in llama.generate(prompt, params)]

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)
    assert tokens(None) != tokens(None)  # an unseeded request draws its own seed


# -- export / resume (live migration) ----------------------------------------------------------


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("split", [1, 5])
def test_resumed_generation_continues_exactly(
    folders: dict[str, Path], llama: Runtime, params: SamplingParams, split: int
) -> None:
    prompt = llama.encode(prompt=PROMPT)
    unmigrated = list(llama.generate(prompt, params))
    source = llama.start(prompt, params)
    before = [source.step() for _ in range(split)]
    state = source.export_state()  # the source decodes on its own: it may be further along
    done = len(state["tokens"]) - state["prompt_len"]
    before += [source.step() for _ in range(done - split)]
    source.close()

    destination = runtime_for(folders["llama"])  # another host: fresh weights, fresh runtime
    after = run(destination.resume(state))

    assert [e.token for e in before + after] == [e.token for e in unmigrated]
    assert "".join(e.text for e in before + after) == "".join(e.text for e in unmigrated)
    assert destination.active() == 0


@pytest.mark.parametrize("batching", [True, False], ids=["batching-target", "serial-target"])
def test_multi_round_migration_prefills_ahead_then_takes_the_final_state(
    folders: dict[str, Path], llama: Runtime, batching: bool
) -> None:
    prompt = llama.encode(prompt=PROMPT)
    unmigrated = [e.token for e in llama.generate(prompt, SAMPLED)]
    # A serial source decodes only when stepped: the rounds happen where the test says (a
    # batched one runs ahead on its own thread and may finish before the pause).
    source = runtime_for(folders["llama"], batching=False).start(prompt, SAMPLED)
    destination = runtime_for(folders["llama"], batching=batching)

    [source.step() for _ in range(3)]
    # Round 1: the target prefills what the source has, and holds, while the source goes on.
    target = destination.resume(source.export_state(), hold=True)
    [source.step() for _ in range(3)]
    round_2 = source.export_state()["tokens"]
    reused = target.prefill(round_2)  # round 2: only the new tokens are computed
    assert target.wait_prefilled(30)
    assert reused == len(prompt) + 3 - (1 if batching else 0)
    assert target.cached == len(round_2) - (1 if batching else 0)
    source.step()
    final = source.pause()  # final round: the source stops and hands over
    cached = target.cached
    assert target.load_state(final) == cached  # the cache is reused: 1 or 2 to go
    rest = run(target)

    assert final["tokens"][len(prompt) :] + [e.token for e in rest] == unmigrated
    assert source.step().finish_reason == "paused"
    source.close()


def test_resume_from_tokens_alone_continues_a_seeded_run(llama: Runtime) -> None:
    """A crashed host exports nothing: the controller resumes from the tokens it relayed."""
    prompt = llama.encode(prompt=PROMPT)
    unmigrated = [e.token for e in llama.generate(prompt, SAMPLED)]
    relayed = unmigrated[:4]

    state = {"tokens": prompt + relayed, "prompt_len": len(prompt), "params": SAMPLED.to_json()}
    rest = run(llama.resume(state))

    assert relayed + [e.token for e in rest] == unmigrated


def test_a_resumed_state_without_max_tokens_stops_at_the_context(llama: Runtime) -> None:
    state = {"tokens": [5] * 124, "prompt_len": 120, "params": {"temperature": 0}}

    with llama.resume(state) as generation:
        assert generation.params.max_tokens == tiny_models.MAX_POSITIONS - 120
        events = run(generation)

    assert len([e for e in events if e.token is not None]) <= tiny_models.MAX_POSITIONS - 124
    assert events[-1].finish_reason in ("length", "eos")


@pytest.mark.parametrize(
    "change",
    [
        {"tokens": []},
        {"tokens": [10**9]},
        {"prompt_len": 0},
        {"prompt_len": 10**6},
        {"params": {"temperature": 5}},
        {"sampler": {"seed": 1, "rng": "not base64!"}},
        {"text": {"prefix": 5, "read": 1}},
        {"finished": True, "finish_reason": "tired"},
    ],
    ids=[
        "no-tokens",
        "token-out-of-vocab",
        "prompt-len-0",
        "prompt-len-too-big",
        "bad-params",
        "bad-rng",
        "bad-text-offsets",
        "bad-finish-reason",
    ],
)
def test_malformed_state_is_rejected(llama: Runtime, change: dict[str, Any]) -> None:
    generation = llama.start(llama.encode(prompt=PROMPT), SAMPLED)
    generation.step()
    state = {**generation.export_state(), **change}
    generation.close()

    with pytest.raises(InvalidRequest):
        llama.resume(state)
    assert llama.active() == 0


# -- stop strings, eos and text release (scripted model) -----------------------------------------


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM that generates `script` after a prompt of `prompt_len` tokens."""

    def __init__(self, vocab: int, script: list[int], prompt_len: int, eos: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 1)
        self.script, self.prompt_len, self.vocab = script, prompt_len, vocab
        self.config = PretrainedConfig(
            max_position_embeddings=128, eos_token_id=eos, num_hidden_layers=1
        )
        self.generation_config = SimpleNamespace(eos_token_id=eos)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, cache: Cache, use_cache: bool = True) -> Any:
        positions = torch.zeros(1, 1, input_ids.shape[1], 1)
        cache.update(positions, positions, 0)  # the cache counts the tokens seen
        seen = cache.get_seq_length()
        logits = torch.zeros(1, 1, self.vocab)
        logits[0, 0, self.script[min(seen - self.prompt_len, len(self.script) - 1)]] = 100.0
        return SimpleNamespace(logits=logits, cache=cache)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_models.build_tokenizer(tmp_path_factory.mktemp("tok"))


def scripted(tokenizer: Any, text: str, *, eos: bool = False) -> tuple[Runtime, list[int]]:
    """A runtime whose model writes `text` (then eos, if asked) after the returned prompt."""
    prompt = tokenizer("Once upon a time")["input_ids"]
    script = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] * eos
    model = ScriptedLM(len(tokenizer), script, len(prompt), tokenizer.eos_token_id)
    return Runtime(model, tokenizer, Path("unused")), prompt


@pytest.mark.parametrize(
    ("text", "stop", "released"),
    [
        ("Hello world, goodbye", ["world"], "Hello "),
        ("Hello world, goodbye", ["bye", "o w"], "Hell"),
        ("Hello world, goodbye", ["Hello"], ""),
        ("Hello world, goodbye", ["worlds"], "Hello world, goodbye"),
        ("café ☕ naïve", ["☕"], "café "),
        ("a\nb\nc", ["\n"], "a"),
    ],
    ids=[
        "one-stop",
        "earliest-of-two",
        "stop-at-start",
        "near-miss-released",
        "multibyte",
        "newline",
    ],
)
def test_stop_string_truncates_released_text(
    tokenizer: Any, text: str, stop: list[str], released: str
) -> None:
    rt, prompt = scripted(tokenizer, text)
    params = SamplingParams(max_tokens=len(tokenizer(text)["input_ids"]), stop=tuple(stop))

    events = list(rt.generate(prompt, params))

    assert "".join(e.text for e in events) == released
    stopped = released != text
    assert events[-1].finish_reason == ("stop" if stopped else "length")


def test_text_that_may_begin_a_stop_string_is_held_until_it_cannot(tokenizer: Any) -> None:
    rt, prompt = scripted(tokenizer, "ab ab abc")
    params = SamplingParams(max_tokens=9, stop=("abc",))

    seen = ""
    for event in rt.generate(prompt, params):
        seen += event.text
        assert "abc" not in seen
        assert not seen.endswith(("a", "ab")) or event.finished

    assert seen == "ab ab "


def test_multibyte_characters_are_never_split(tokenizer: Any) -> None:
    text = "naïve café ☕ 日本語 🙂!"
    rt, prompt = scripted(tokenizer, text)
    n = len(tokenizer(text)["input_ids"])
    assert n > len(text), "fixture should split characters over several tokens"

    events = list(rt.generate(prompt, SamplingParams(max_tokens=n)))

    assert all("\ufffd" not in e.text for e in events)
    assert "".join(e.text for e in events) == text


def test_eos_ends_the_stream_and_is_not_shown(tokenizer: Any) -> None:
    rt, prompt = scripted(tokenizer, "Hi there", eos=True)

    events = list(rt.generate(prompt, SamplingParams(max_tokens=50, stop=("there!",))))

    assert events[-1].token == tokenizer.eos_token_id
    assert events[-1].finish_reason == "eos"
    # "there" was held as a possible start of "there!" and is let out at eos.
    assert "".join(e.text for e in events) == "Hi there"


def test_eos_token_of_the_model_config_stops_a_real_model(
    folders: dict[str, Path], llama: Runtime
) -> None:
    prompt = llama.encode(prompt=PROMPT)
    free = [e.token for e in llama.generate(prompt, GREEDY)]
    at = next(i for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    model = load_model(folders["llama"])
    model.generation_config.eos_token_id = free[at]  # an ordinary byte token, not a special one
    rt = Runtime(model, llama.tokenizer, folders["llama"])

    events = list(rt.generate(prompt, GREEDY))

    assert [e.token for e in events] == free[: at + 1]
    assert events[-1].finish_reason == "eos"
    assert "".join(e.text for e in events) == rt.tokenizer.decode(
        free[:at], skip_special_tokens=True
    )


def test_stop_string_taken_from_a_greedy_run(folders: dict[str, Path]) -> None:
    rt = runtime_for(folders["gpt2"])
    prompt = rt.encode(prompt=PROMPT)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    full = "".join(e.text for e in rt.generate(prompt, params))
    stop = full[5:8]

    events = list(rt.generate(prompt, SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,))))

    assert "".join(e.text for e in events) == full[: full.index(stop)]
    assert events[-1].finish_reason == "stop"
    assert len(events) < 20


def test_held_stop_prefix_survives_migration(tokenizer: Any) -> None:
    rt, prompt = scripted(tokenizer, "one two three")
    params = SamplingParams(max_tokens=13, stop=("two!", "thr"))
    source = rt.start(prompt, params)
    before = [source.step()]
    while not source.export_state()["text"]["held"]:
        before.append(source.step())
    assert "".join(e.text for e in before) == "one "  # "t", "tw" or "two" is held back
    state = source.export_state()
    source.close()

    after = run(rt.resume(state))

    assert "".join(e.text for e in before + after) == "one two "
    assert after[-1].finish_reason == "stop"


# -- prompts ----------------------------------------------------------------------------------


def test_prompt_encoding_matches_the_tokenizer(llama: Runtime) -> None:
    assert llama.encode(prompt=PROMPT) == llama.tokenizer(PROMPT)["input_ids"]


def test_chat_messages_go_through_the_chat_template(llama: Runtime) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]},
    ]

    tokens = llama.encode(messages=messages)

    text = "<s>system: You are a helpful assistant.\nuser: Tell me a story.\nassistant: "
    assert llama.tokenizer.decode(tokens) == text


def test_chat_without_a_template_asks_for_a_prompt(tmp_path: Path) -> None:
    src = tiny_models.build_tiny_model("llama", tmp_path / "src", chat_template=False)
    convert(src, tmp_path / "dst")
    rt = runtime_for(tmp_path / "dst")

    with pytest.raises(InvalidRequest, match="model has no chat template; use prompt"):
        rt.encode(messages=[{"role": "user", "content": "hi"}])
    assert rt.encode(prompt="hi")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
        {"prompt": 42},
        {"messages": []},
        {"messages": "hi"},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"messages": ["hi"]},
    ],
    ids=[
        "neither",
        "both",
        "prompt-not-str",
        "no-messages",
        "messages-not-list",
        "bad-role",
        "no-content",
        "content-not-str",
        "image-part",
        "message-not-object",
    ],
)
def test_bad_prompt_or_messages_are_rejected(llama: Runtime, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        llama.encode(**kwargs)


@pytest.mark.parametrize(
    ("tokens", "max_tokens", "match"),
    [
        ([], 4, "non-empty"),
        ([5] * 120, 9, "maximum context length is 128 tokens.*129 tokens"),
        ([5] * 128, 1, "leaves no room"),
        ([5, 10**6], 4, "token ids"),
        ([5, -1], 4, "token ids"),
    ],
    ids=[
        "empty",
        "prompt-plus-max-tokens-too-long",
        "prompt-fills-context",
        "id-too-big",
        "negative-id",
    ],
)
def test_bad_prompt_tokens_are_rejected(
    llama: Runtime, tokens: list[int], max_tokens: int, match: str
) -> None:
    with pytest.raises(InvalidRequest, match=match):
        llama.start(tokens, SamplingParams(max_tokens=max_tokens))
    assert llama.active() == 0


def test_context_limit_comes_from_the_model_config(llama: Runtime) -> None:
    assert llama.max_context == tiny_models.MAX_POSITIONS
    with llama.start([5] * 120, SamplingParams(max_tokens=8, ignore_eos=True)) as generation:
        assert len(list(run(generation))) == 8


def test_without_max_tokens_a_long_prompt_gets_what_the_context_leaves(llama: Runtime) -> None:
    params = SamplingParams.from_request({"temperature": 0}, max_tokens_limit=512)

    with llama.start([5] * 120, params) as generation:
        assert generation.params.max_tokens == tiny_models.MAX_POSITIONS - 120
        events = run(generation)
    assert len([e for e in events if e.token is not None]) <= 8
    assert events[-1].finish_reason in ("length", "eos")


@pytest.mark.parametrize(
    ("max_tokens", "prompt_len", "param"),
    [(9, 120, "max_tokens"), (None, 128, "messages")],
    ids=["max-tokens-too-many", "prompt-fills-context"],
)
def test_context_overflow_names_the_field_at_fault(
    llama: Runtime, max_tokens: int | None, prompt_len: int, param: str
) -> None:
    params = SamplingParams.from_request({"max_tokens": max_tokens}, max_tokens_limit=512)

    with pytest.raises(ContextLengthExceeded) as info:
        llama.start([5] * prompt_len, params, prompt_param="messages")
    assert info.value.param == param
    assert llama.active() == 0


# -- concurrency ------------------------------------------------------------------------------


def test_concurrent_generations_match_sequential_ones(llama: Runtime) -> None:
    prompts = [llama.encode(prompt=p) for p in ("The quick brown fox", "Hello world!", "Tests")]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    sequential = [[e.token for e in llama.generate(p, params)] for p in prompts]
    results: dict[int, list[int | None]] = {}
    barrier = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = [e.token for e in llama.generate(prompts[i], params)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert [results[i] for i in range(len(prompts))] == sequential
    assert llama.active() == 0


def test_full_instance_answers_overloaded_and_frees_slots(folders: dict[str, Path]) -> None:
    rt = runtime_for(folders["llama"], concurrency=1, queue_timeout=0.05)
    prompt = rt.encode(prompt=PROMPT)
    first = rt.start(prompt, GREEDY)
    assert rt.active() == 1

    with pytest.raises(Overloaded) as info:
        rt.start(prompt, GREEDY)

    assert info.value.retry_after == 1.0 and info.value.status == 429
    first.close()
    first.close()  # idempotent: must not free a second slot
    assert rt.active() == 0
    stream = rt.generate(prompt, GREEDY)
    next(stream)
    assert rt.active() == 1
    stream.close()  # a client that disconnects mid-stream frees its slot
    assert rt.active() == 0


def test_waiting_request_gets_the_slot_when_it_frees(folders: dict[str, Path]) -> None:
    rt = runtime_for(folders["llama"], concurrency=1, queue_timeout=30.0)
    prompt = rt.encode(prompt=PROMPT)
    first = rt.start(prompt, GREEDY)
    free = rt._slots._free
    blocked = threading.Event()

    class Watched:
        """The slot semaphore, telling when a caller found no slot free and waits."""

        def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
            if free.acquire(blocking=False):
                return True
            blocked.set()
            return free.acquire(timeout=timeout)

        def release(self) -> None:
            free.release()

    rt._slots._free = Watched()  # type: ignore[assignment]
    closer = threading.Thread(target=lambda: blocked.wait(30) and first.close(), daemon=True)
    closer.start()

    second = rt.start(prompt, GREEDY)  # waits for the slot instead of failing

    closer.join(30)
    assert blocked.is_set(), "the second request never had to wait"
    assert rt.active() == 1
    second.close()
    assert rt.active() == 0


def test_finished_generation_gives_back_its_slot(folders: dict[str, Path]) -> None:
    rt = runtime_for(folders["llama"], concurrency=1, queue_timeout=0.05)
    generation = rt.start(rt.encode(prompt=PROMPT), SamplingParams(max_tokens=1, ignore_eos=True))
    generation.step()

    assert generation.finished and rt.active() == 0
    assert generation.export_state()["finish_reason"] == "length"


def test_closed_generation_and_unloaded_runtime_refuse_to_continue(
    folders: dict[str, Path],
) -> None:
    rt = runtime_for(folders["llama"])
    prompt = rt.encode(prompt=PROMPT)
    with rt.start(prompt, GREEDY) as closed:
        pass
    running = rt.start(prompt, GREEDY)
    running.step()

    rt.close()

    with pytest.raises(Conflict):
        closed.step()
    with pytest.raises(Unavailable):  # after the tokens made before the unload
        for _ in range(GREEDY.max_tokens):
            running.step()
    running.close()
    assert rt.active() == 0


def test_embedding_request_on_a_generator_is_rejected(llama: Runtime) -> None:
    with pytest.raises(InvalidRequest, match="task is 'generate'"):
        llama.embed(["hello"])


@pytest.mark.parametrize(
    ("arch", "task", "expected"),
    [
        ("llama", "generate", "LlamaForCausalLM"),
        ("llama", "embed", "LlamaModel"),
        ("gpt2", "generate", "GPT2LMHeadModel"),
        ("gpt2", "embed", "GPT2Model"),
    ],
)
def test_model_class_for_task(
    folders: dict[str, Path], arch: str, task: str, expected: str
) -> None:
    assert model_class_for(folders[arch], task).__name__ == expected


def test_model_class_for_rejects_an_unknown_task(folders: dict[str, Path]) -> None:
    with pytest.raises(InvalidRequest, match="'task'"):
        model_class_for(folders["llama"], "translate")
