"""A loaded model serving requests: encode, start / resume generations, stream, embed.

A generate instance batches its generations (runtime/_batch.py) unless `batching=False`
or the model's cache cannot be laid out in rows (sliding-window attention, caches that are
not per-layer keys and values): then each generation runs serially (runtime/_serial.py).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

import torch

from sllm.core.errors import ContextLengthExceeded, FunctionError, InvalidRequest
from sllm.core.messages import MAX_EMBED_INPUTS, EmbedInput, embedding_inputs

from . import _embed, _prompt
from ._batch import Batcher, unavailable
from ._embed_batch import EmbedBatcher
from ._engine import Engine, Slots
from ._generation import BatchedGeneration, Generation, new_id, parse_state, restore
from ._models import TASKS
from ._params import MAX_N, SamplingParams
from ._sequence import Sequence, TokenEvent
from ._serial import SerialGeneration
from ._text import TextStream

log = logging.getLogger("sllm.runtime")
DEFAULT_KV_CACHE_BYTES = 1 << 30


class Runtime:
    """One model instance: generations (or embeddings) with a bounded number running at once."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        folder: Path,
        *,
        task: str = "generate",
        concurrency: int = 4,
        queue_timeout: float = 30.0,
        batching: bool = True,
        kv_cache_bytes: int | None = None,
        prefill_chunk: int = 256,
    ) -> None:
        if task not in TASKS:
            raise InvalidRequest(f"'task' must be one of {list(TASKS)}, got {task!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidRequest(f"'concurrency' must be an integer >= 1, got {concurrency!r}")
        if not queue_timeout >= 0:
            raise InvalidRequest(f"'queue_timeout' must be >= 0 seconds, got {queue_timeout!r}")
        self.task = task
        self.concurrency = concurrency
        self.folder = Path(folder)
        self._engine = Engine(model, tokenizer)
        self._slots = Slots(concurrency, queue_timeout)
        self.device: torch.device = self._engine.device
        self.max_context: int = self._engine.max_context
        self.pooling: _embed.PoolingConfig | None = None
        if task == "embed":
            self.pooling = _embed.pooling_config(self.folder)
            if tokenizer.pad_token is None:
                # Batches need some pad id; the attention mask hides it, so any token will do.
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.kv_cache_bytes = kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
        self._batcher: Batcher | None = None
        if task == "generate" and batching:
            self._batcher = _batcher_for(self._engine, self.kv_cache_bytes, prefill_chunk)
        # Concurrent embed calls share padded forward passes (right padding: see _embed_batch).
        self._embedder = EmbedBatcher(
            lambda b: self._pooled(b, self.pooling or _embed.PoolingConfig())
        )

    @property
    def batching(self) -> bool:
        """Whether this instance's generations run as one batch."""
        return self._batcher is not None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer."""
        return self._engine.tokenizer

    def encode(
        self, *, prompt: str | None = None, messages: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of a completion `prompt` or of chat `messages` (exactly one of them)."""
        if (prompt is None) == (messages is None):
            raise InvalidRequest("give exactly one of 'prompt' and 'messages'")
        with self._engine.tokenizer_lock:
            if messages is not None:
                return _prompt.encode_messages(self.tokenizer, messages)
            return _prompt.encode_prompt(self.tokenizer, prompt)

    def start(
        self,
        tokens: list[int],
        params: SamplingParams,
        *,
        prompt_param: str = "prompt",
        gen_id: str | None = None,
    ) -> Generation:
        """A generation of `tokens`, admitted; waits for a slot, then raises Overloaded.

        `params` are fitted to the context first (see `SamplingParams.fitted`); a prompt too
        long for it is a ContextLengthExceeded naming `prompt_param`, the field it came in.
        """
        return self.start_many(tokens, params, 1, prompt_param=prompt_param, gen_id=gen_id)[0]

    def start_many(
        self,
        tokens: list[int],
        params: SamplingParams,
        n: int,
        *,
        prompt_param: str = "prompt",
        gen_id: str | None = None,
    ) -> list[Generation]:
        """`n` generations of one prompt (OpenAI's `n`), sharing its prefill when batched.

        With a seed, choice i samples with seed + i, so the choices differ yet repeat.
        Ids are `gen_id` for one choice, "{gen_id}.{i}" for several.
        """
        self._require("generate")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise InvalidRequest(f"'n' must be an integer in [1, {MAX_N}], got {n!r}", param="n")
        tokens = self._engine.check_tokens(tokens, prompt_param)
        params = params.fitted(len(tokens), self.max_context, prompt_param=prompt_param)
        params.check_vocab(self._engine.vocab)
        self._engine.sampler(params)  # a grammar that does not compile is a 400 before a slot
        base = gen_id or new_id()
        ids = [base] if n == 1 else [f"{base}.{i}" for i in range(n)]
        seeds = [None if params.seed is None else (params.seed + i) % (1 << 63) for i in range(n)]
        slot = self._slots.acquire()
        if self._batcher is None:
            serial: list[Generation] = [self._start_serial(tokens, params, slot, ids[0])]
            serial += [
                self._start_serial(tokens, params, None, i, seed=s)
                for i, s in zip(ids[1:], seeds[1:], strict=False)
            ]
            return serial
        seqs = [
            Sequence(
                i,
                list(tokens),
                len(tokens),
                params,
                self._engine.sampler(params, s),
                TextStream.after(params.stop, len(tokens), len(tokens)),
            )
            for i, s in zip(ids, seeds, strict=False)
        ]
        for seq in seqs[1:]:
            seq.share_from = seqs[0]
        try:
            self._batcher.submit(seqs, self._slots.timeout)
        except BaseException:
            slot.release()
            raise
        # The request's one slot goes back when its first choice is closed.
        return [
            BatchedGeneration(self._batcher, seq, slot if i == 0 else None)
            for i, seq in enumerate(seqs)
        ]

    def _start_serial(
        self,
        tokens: list[int],
        params: SamplingParams,
        slot: Any,
        gen_id: str,
        *,
        seed: int | None = None,
    ) -> SerialGeneration:
        generation = SerialGeneration(
            self._engine, slot, prompt_len=len(tokens), params=params, gen_id=gen_id
        )
        if seed is not None:
            generation._sampler = self._engine.sampler(params, seed)
        try:
            generation.prefill(tokens)
        except BaseException:
            generation.close()
            raise
        return generation

    def resume(self, state: Mapping[str, Any], *, hold: bool = False) -> Generation:
        """A generation continuing from `Generation.export_state()` (possibly from another host).

        With `hold`, it is only prefilled: a migration target that waits for its final
        state (`load_state`) before decoding.
        """
        self._require("generate")
        parsed = parse_state(state, self._engine)
        sampler, text = restore(parsed, state, self._engine)  # refused before any slot
        gen_id = state.get("id") if isinstance(state.get("id"), str) else None
        slot = self._slots.acquire()
        if self._batcher is None:
            generation = SerialGeneration(
                self._engine,
                slot,
                prompt_len=parsed.prompt_len,
                params=parsed.params,
                gen_id=gen_id,
            )
            try:
                generation.load_state(state)
            except BaseException:
                generation.close()
                raise
            return generation
        seq = Sequence(
            gen_id or new_id(),
            parsed.tokens,
            parsed.prompt_len,
            parsed.params,
            sampler,
            text,
            hold=hold,
        )
        handle = BatchedGeneration(self._batcher, seq, slot)
        if parsed.finish_reason is not None:
            seq.phase, seq.finish_reason = "finished", parsed.finish_reason
            seq.push(TokenEvent(None, "", len(seq.generated), True, parsed.finish_reason))
            return handle
        try:
            self._batcher.submit([seq], self._slots.timeout)
        except BaseException:
            slot.release()
            raise
        return handle

    def generate(
        self, tokens: list[int], params: SamplingParams, *, prompt_param: str = "prompt"
    ) -> Generator[TokenEvent, None, None]:
        """Start a generation now and stream its events; ending or closing the stream frees it."""
        # Errors surface here, not at the first next().
        generation = self.start(tokens, params, prompt_param=prompt_param)
        return _stream(generation)

    def embed(self, inputs: list[EmbedInput]) -> tuple[list[list[float]], int]:
        """One vector per input (a text or its token ids) and the number of tokens used.

        An input longer than the model takes is a ContextLengthExceeded, as with OpenAI and
        vLLM: cutting it would embed a text other than the one sent.
        """
        self._require("embed")
        inputs = embedding_inputs(inputs, MAX_EMBED_INPUTS)
        pooling = self.pooling or _embed.PoolingConfig()
        limit = min(self.max_context, pooling.max_seq_length or self.max_context)
        ids = self._input_ids(inputs, limit)  # checked before joining a shared batch
        with self._slots.held():
            vectors = self._embedder.embed(ids, self.tokenizer.pad_token_id or 0)
        return vectors, sum(len(row) for row in ids)

    def _input_ids(self, inputs: list[EmbedInput], limit: int) -> list[list[int]]:
        """Token ids of each input (texts tokenized together), each at most `limit` long."""
        texts = [item for item in inputs if isinstance(item, str)]
        with self._engine.tokenizer_lock:
            encoded = iter(self.tokenizer(texts)["input_ids"] if texts else [])
        ids = [
            list(next(encoded))
            if isinstance(item, str)
            else self._engine.check_tokens(item, "input")
            for item in inputs
        ]
        for i, row in enumerate(ids):
            if len(row) > limit:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {len(row)} tokens in 'input[{i}]' for embedding generation. "
                    "Please reduce the length of the input.",
                    param="input",
                )
        return ids

    def _pooled(self, batch: dict[str, Any], pooling: _embed.PoolingConfig) -> torch.Tensor:
        hidden = self._engine.hidden_states(batch)
        with torch.inference_mode():
            mask = batch["attention_mask"].to(hidden.device)
            return _embed.pool(hidden, mask, pooling).to("cpu")

    def active(self) -> int:
        """Generations (and embedding batches) holding a slot right now."""
        return self._slots.active

    def kv_rows(self) -> int:
        """Generations holding a row of the batched KV cache now (0 without batching)."""
        return self._batcher.running if self._batcher is not None else 0

    def close(self) -> None:
        """Drop the model so its memory can go; running generations then fail with Unavailable."""
        if self._batcher is not None:
            self._batcher.close(unavailable())
        self._engine.close()

    def _require(self, task: str) -> None:
        if self.task != task:
            raise InvalidRequest(f"this function's task is {self.task!r}, not {task!r}")


def _batcher_for(engine: Engine, budget: int, prefill_chunk: int) -> Batcher | None:
    """A batcher for `engine`'s model, or None when its cache cannot be batched in rows."""
    config = engine.model.config
    types = getattr(config, "layer_types", None) or ()
    sliding = getattr(config, "sliding_window", None) and (
        getattr(config, "use_sliding_window", True) or "sliding_attention" in types
    )
    accepts = inspect.signature(engine.model.forward).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepts.values())
    if not takes_all and not {"position_ids", "attention_mask"} <= set(accepts):
        log.info("%s: serial generation (no position_ids / attention_mask)", type(engine.model))
        return None
    if sliding or getattr(config, "is_encoder_decoder", False):
        log.info(
            "%s: serial generation (sliding-window or encoder-decoder attention)",
            type(engine.model).__name__,
        )
        return None
    batcher = Batcher(engine, budget_bytes=budget, prefill_chunk=prefill_chunk)
    try:
        batcher.probe()
    except (FunctionError, RuntimeError, AttributeError, TypeError) as exc:
        log.info("%s: serial generation (%s)", type(engine.model).__name__, exc)
        return None
    return batcher


def _stream(generation: Generation) -> Generator[TokenEvent, None, None]:
    with generation:
        while True:
            event = generation.step()
            yield event
            if event.finished:
                return
