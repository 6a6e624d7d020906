"""The model behind a Runtime: its limits, its forward passes, and the slots that bound concurrency.

Batched generations (runtime/_batch.py) run through `run`, from the instance's one batcher
thread. Serial generations (runtime/_serial.py, `batching=False`) keep their own KV caches
and take `lock` around each `forward`, so concurrent streams interleave token by token.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import Cache, DynamicCache

from sllm.core.errors import FunctionError, InvalidRequest, Overloaded, Unavailable

from ._grammar import Grammars
from ._models import context_length, eos_token_ids, vocab_size
from ._params import SamplingParams
from ._sampling import Sampler


class Engine:
    """One loaded model with its tokenizer, limits and forward lock."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model: Any = model
        self.tokenizer: Any = tokenizer
        self.device = _device_of(model)
        self.max_context = context_length(model.config, tokenizer)
        self.vocab = vocab_size(model)
        self.eos = eos_token_ids(model, tokenizer)
        params = inspect.signature(model.forward).parameters
        # Only the last position's logits are needed; model.generate asks for just those too.
        self._keep_last = "logits_to_keep" in params
        # transformers 5 takes and returns the KV cache as `cache` and deprecates
        # `past_key_values` (removal announced); older releases only know the latter.
        self.cache_name = "cache" if "cache" in params else "past_key_values"
        self.dtype: torch.dtype = getattr(model, "dtype", torch.float32)
        self.lock = threading.Lock()
        # Fast tokenizers refuse concurrent calls that change padding/truncation settings.
        self.tokenizer_lock = threading.Lock()
        self._grammars: Grammars | None = None

    def sampler(self, params: SamplingParams, seed: int | None = None) -> Sampler:
        """A sampler for one sequence of this model: its grammar compiled, its eos ids known."""
        return Sampler(params, seed, grammar=self._grammar(params), eos=tuple(self.eos))

    def restore_sampler(
        self, params: SamplingParams, doc: Any, tokens: list[int], prompt_len: int
    ) -> Sampler:
        """The sampler of an exported state, its grammar and penalties replayed over `tokens`."""
        return Sampler.from_json(
            params, doc, tokens, prompt_len, grammar=self._grammar(params), eos=tuple(self.eos)
        )

    def _grammar(self, params: SamplingParams) -> Any:
        if params.response_format is None:
            return None
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.vocab, self.eos)
        with self.tokenizer_lock:
            return self._grammars.factory(params.response_format)

    def close(self) -> None:
        """Forget the model; later forward passes fail with Unavailable."""
        with self.lock:
            self.model = None

    def check_tokens(self, tokens: Any, what: str = "tokens") -> list[int]:
        """`tokens` as a list of valid token ids, or InvalidRequest."""
        if not isinstance(tokens, list) or not tokens:
            raise InvalidRequest(f"{what!r} must be a non-empty list of token ids", param=what)
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab:
                raise InvalidRequest(
                    f"{what!r} must hold token ids in [0, {self.vocab - 1}], got {t!r}",
                    param=what,
                )
        return list(tokens)

    def new_cache(self) -> Cache:
        """An empty KV cache for one generation, laid out as the model's config says."""
        return DynamicCache(config=self.model.config)

    def forward(self, tokens: list[int], cache: Cache) -> tuple[torch.Tensor, Cache]:
        """Run `tokens` after what `cache` holds (it grows by them); last logits (CPU fp32), cache.

        The cache is passed and returned explicitly (transformers' Cache API), so the model
        never builds one itself nor sees the deprecated `past_key_values` name.
        """
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([tokens], dtype=torch.long, device=self.device),
            self.cache_name: cache,
            "use_cache": True,
        }
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        with self._running() as model:
            out = model(**kwargs)
            logits = out.logits[0, -1].to(device="cpu", dtype=torch.float32)
            return logits, getattr(out, self.cache_name)

    def require_model(self) -> Any:
        """The model, or Unavailable once the instance was unloaded."""
        model = self.model
        if model is None:
            raise Unavailable("the model instance was unloaded", retry_after=1.0)
        return model

    def run(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        cache: Cache,
    ) -> torch.Tensor:
        """One batched pass (the batcher's): last-position logits (batch, vocab) on the device.

        `mask` is the 4-D additive attention mask, passed through as-is by transformers;
        `cache` is the step's view of the slot cache. Call under torch.inference_mode().
        """
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": mask,
            self.cache_name: cache,
            "use_cache": True,
        }
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        return self.require_model()(**kwargs).logits[:, -1]

    def hidden_states(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last hidden states (batch, seq, dim) for a tokenized batch."""
        with self._running() as model:
            out = model(**{k: v.to(self.device) for k, v in inputs.items()})
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    @contextmanager
    def _running(self) -> Iterator[Any]:
        with self.lock, torch.inference_mode():
            if self.model is None:
                raise Unavailable("the model instance was unloaded", retry_after=1.0)
            try:
                yield self.model
            except RuntimeError as exc:  # torch reports OOM and kernel failures this way
                raise FunctionError(f"the model failed in its forward pass: {exc}") from exc


def _device_of(model: Any) -> torch.device:
    # With a device map the inputs go where the embeddings are; model.device says the same.
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return torch.device(param.device)
    return torch.device("cpu")


class Slots:
    """A bounded number of concurrent requests; callers wait up to `timeout`, then Overloaded."""

    def __init__(self, concurrency: int, timeout: float) -> None:
        self.concurrency = concurrency
        self.timeout = timeout
        self._free = threading.BoundedSemaphore(concurrency)
        self._count_lock = threading.Lock()
        self._active = 0

    def acquire(self) -> Slot:
        """Take a slot or raise Overloaded after waiting `timeout` seconds."""
        if not self._free.acquire(timeout=self.timeout):
            raise Overloaded(
                f"all {self.concurrency} concurrent slots of this instance are busy "
                f"(waited {self.timeout:g}s)",
                retry_after=1.0,
            )
        with self._count_lock:
            self._active += 1
        return Slot(self)

    def _release(self) -> None:
        with self._count_lock:
            self._active -= 1
        self._free.release()

    @property
    def active(self) -> int:
        """Slots taken right now."""
        return self._active

    @contextmanager
    def held(self) -> Iterator[None]:
        """A slot for the duration of the block."""
        slot = self.acquire()
        try:
            yield
        finally:
            slot.release()


class Slot:
    """One taken slot; releasing it twice is harmless."""

    def __init__(self, slots: Slots) -> None:
        self._slots: Slots | None = slots
        self._lock = threading.Lock()

    def release(self) -> None:
        """Give the slot back (once)."""
        with self._lock:
            slots, self._slots = self._slots, None
        if slots is not None:
            slots._release()
