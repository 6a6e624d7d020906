"""A loaded model serving requests: encode, start / resume generations, stream, embed."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

import torch

from sllm.core.errors import InvalidRequest

from . import _embed, _prompt
from ._engine import Engine, Slots
from ._generation import Generation, TokenEvent, _parse_state
from ._models import TASKS
from ._params import SamplingParams


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

    def start(self, tokens: list[int], params: SamplingParams) -> Generation:
        """A generation of `tokens`, prefilled; waits for a slot, then raises Overloaded."""
        self._require("generate")
        tokens = self._engine.check_tokens(tokens, "prompt")
        self._check_budget(len(tokens), params)
        slot = self._slots.acquire()
        generation = Generation(self._engine, slot, prompt_len=len(tokens), params=params)
        try:
            generation.prefill(tokens)
        except BaseException:
            generation.close()
            raise
        return generation

    def resume(self, state: Mapping[str, Any]) -> Generation:
        """A generation continuing from `Generation.export_state()` (possibly from another host)."""
        self._require("generate")
        parsed = _parse_state(state, self._engine)
        self._check_budget(parsed.prompt_len, parsed.params)
        slot = self._slots.acquire()
        generation = Generation(
            self._engine, slot, prompt_len=parsed.prompt_len, params=parsed.params
        )
        try:
            generation.load_state(state)
        except BaseException:
            generation.close()
            raise
        return generation

    def generate(
        self, tokens: list[int], params: SamplingParams
    ) -> Generator[TokenEvent, None, None]:
        """Start a generation now and stream its events; ending or closing the stream frees it."""
        generation = self.start(tokens, params)  # errors surface here, not at the first next()
        return _stream(generation)

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One vector per text and the number of input tokens used."""
        self._require("embed")
        texts = _embed.check_texts(texts)
        pooling = self.pooling or _embed.PoolingConfig()
        limit = min(self.max_context, pooling.max_seq_length or self.max_context)
        with self._slots.held():
            with self._engine.tokenizer_lock:
                # Right padding: real tokens never see pads and keep their positions, so a
                # text embeds the same alone or in a batch.
                batch = self.tokenizer(
                    texts,
                    padding=True,
                    truncation=True,
                    max_length=limit,
                    return_tensors="pt",
                    padding_side="right",
                )
            vectors = self._pooled(dict(batch), pooling)
        used = int(batch["attention_mask"].sum())
        return vectors.tolist(), used

    def _pooled(self, batch: dict[str, Any], pooling: _embed.PoolingConfig) -> torch.Tensor:
        hidden = self._engine.hidden_states(batch)
        with torch.inference_mode():
            mask = batch["attention_mask"].to(hidden.device)
            return _embed.pool(hidden, mask, pooling).to("cpu")

    def active(self) -> int:
        """Generations (and embedding batches) holding a slot right now."""
        return self._slots.active

    def close(self) -> None:
        """Drop the model so its memory can go; running generations then fail with Unavailable."""
        self._engine.close()

    def _require(self, task: str) -> None:
        if self.task != task:
            raise InvalidRequest(f"this function's task is {self.task!r}, not {task!r}")

    def _check_budget(self, prompt_len: int, params: SamplingParams) -> None:
        if prompt_len + params.max_tokens > self.max_context:
            raise InvalidRequest(
                f"prompt of {prompt_len} tokens plus max_tokens {params.max_tokens} exceeds the "
                f"model's context of {self.max_context} tokens"
            )


def _stream(generation: Generation) -> Generator[TokenEvent, None, None]:
    with generation:
        while True:
            event = generation.step()
            yield event
            if event.finished:
                return
