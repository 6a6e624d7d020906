"""A loaded model serving requests: encode, start / resume generations, stream, embed."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

import torch

from sllm.core.errors import ContextLengthExceeded, InvalidRequest
from sllm.core.messages import MAX_EMBED_INPUTS, EmbedInput, embedding_inputs

from . import _embed, _prompt
from ._embed_batch import EmbedBatcher
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
        # Concurrent embed calls share padded forward passes (right padding: see _embed_batch).
        self._embedder = EmbedBatcher(
            lambda b: self._pooled(b, self.pooling or _embed.PoolingConfig())
        )

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
        self, tokens: list[int], params: SamplingParams, *, prompt_param: str = "prompt"
    ) -> Generation:
        """A generation of `tokens`, prefilled; waits for a slot, then raises Overloaded.

        `params` are fitted to the context first (see `SamplingParams.fitted`); a prompt too
        long for it is a ContextLengthExceeded naming `prompt_param`, the field it came in.
        """
        self._require("generate")
        tokens = self._engine.check_tokens(tokens, prompt_param)
        params = params.fitted(len(tokens), self.max_context, prompt_param=prompt_param)
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
        # A state without max_tokens runs to the end of the context, as at its start.
        params = parsed.params.fitted(parsed.prompt_len, self.max_context)
        slot = self._slots.acquire()
        generation = Generation(self._engine, slot, prompt_len=parsed.prompt_len, params=params)
        try:
            generation.load_state(state)
        except BaseException:
            generation.close()
            raise
        return generation

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

    def close(self) -> None:
        """Drop the model so its memory can go; running generations then fail with Unavailable."""
        self._engine.close()

    def _require(self, task: str) -> None:
        if self.task != task:
            raise InvalidRequest(f"this function's task is {self.task!r}, not {task!r}")


def _stream(generation: Generation) -> Generator[TokenEvent, None, None]:
    with generation:
        while True:
            event = generation.step()
            yield event
            if event.finished:
                return
