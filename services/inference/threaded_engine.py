"""What the torch and vLLM engines share: one worker thread owns the model (DESIGN §6).

Coroutines hand work to the worker under one condition variable (`_submit`) and wait on a future that the
worker resolves on their event loop (`Reply`). A weight update is checked off the event loop, staged, and
swapped in by the worker between batches (`_apply`), so no completion mixes versions. Every reply
handed to the worker is tracked until its coroutine has it back; when the worker stops (closed, or dead),
every one still unanswered fails with `EngineClosed`, wherever the worker held it: queued, staged, or
taken off the queues in the batch or swap it died in.

A subclass sets the model's facts (`_template`, `_aliases`, `_max_model_len`, `_vocab_size`, `stats`),
starts the worker with `_start_worker` and implements what is its own: `_generate` (queue one checked
request), `_check_weights`, `_serve` (the worker's loop) and `_swap_in`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from services.inference.engine import EngineClosed, Generation

ReplyT = TypeVar("ReplyT", bound="Reply")


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """Runs on the event loop: resolve `future` unless its waiter has gone (cancelled)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass(eq=False, kw_only=True)
class Reply:
    """Where the worker thread answers one waiting coroutine. Build it in that coroutine: it waits on the
    running event loop."""

    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    future: asyncio.Future = field(init=False)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()

    def answer(self, result: Any) -> None:
        """From any thread: resolve the future with `result`."""
        self._send(result, None)

    def fail(self, error: BaseException) -> None:
        """From any thread: raise `error` in the waiting coroutine."""
        self._send(None, error)

    def _send(self, result: Any, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)


@dataclass(eq=False)
class StagedWeights(Reply):
    """Checked weights waiting for the worker to swap them in as `version`."""

    weights: dict[str, Tensor]
    version: int


@dataclass(frozen=True)
class SamplingRequest:
    """The arguments of one `generate` call."""

    prompts: list[list[int]]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


class ThreadedEngine:
    """An `InferenceEngine` whose model lives on one worker thread; see the module docstring."""

    engine_label: ClassVar[str] = "inference engine"  # for the logs: "<label> worker died"
    close_timeout_s: ClassVar[float] = 30.0  # how long `close` waits for the worker to stop
    _log: ClassVar[logging.Logger] = logging.getLogger("r2vpo.inference.engine")

    model_name: str
    stats: dict[str, int]  # counters for tests and benchmarks; "swaps" counts weight swaps
    _template: Mapping[str, Tensor]  # names, shapes and dtypes of the model's state dict (meta device)
    _aliases: dict[str, str]  # tied names {alias: name}: an update may leave the alias out
    _max_model_len: int
    _vocab_size: int
    _worker: threading.Thread

    def __init__(self, *, max_batch_size: int, version: int) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self._version = version
        self._cond = threading.Condition()  # guards the queues, `_staged`, `_unanswered` and `_closed`
        self._staged: list[StagedWeights] = []
        self._unanswered: set[Reply] = set()  # handed to the worker, not yet back with their coroutine
        self._closed = False

    # --- the InferenceEngine interface --------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def state_dict_template(self) -> Mapping[str, Tensor]:
        return self._template

    async def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[Generation]]:
        request = SamplingRequest(prompts, n, max_tokens, temperature, top_p, seed)
        self._check_request(request)
        if not prompts:
            return []
        return await self._generate(request)

    async def load_weights(self, state_dict: Mapping[str, Tensor], version: int) -> bool:
        if version <= self._version:
            return False
        checked = await asyncio.to_thread(self._check_weights, state_dict)
        return await self._submit(StagedWeights(checked, version), self._staged.append)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout=self.close_timeout_s)

    # --- what a subclass implements -----------------------------------------------------------------

    async def _generate(self, request: SamplingRequest) -> list[list[Generation]]:
        """Queue a checked request with at least one prompt (through `_submit`) and await its result."""
        raise NotImplementedError

    def _check_weights(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Raise ValueError unless `state_dict` fits the model; return the tensors to stage."""
        raise NotImplementedError

    def _serve(self) -> None:
        """The worker's loop: return once `_closed` is set."""
        raise NotImplementedError

    def _swap_in(self, weights: dict[str, Tensor]) -> None:
        """On the worker thread, between batches: load checked weights into the model."""
        raise NotImplementedError

    def _swap_failed(self, stage: StagedWeights, exc: Exception) -> None:
        """`_swap_in` raised although the checks passed: tell the caller. Raise to stop the worker."""
        stage.fail(exc)

    # --- checks ------------------------------------------------------------------------------------

    def _check_request(self, request: SamplingRequest) -> None:
        self._check_sampling(request)
        self._check_prompts(request.prompts, request.max_tokens)

    def _check_sampling(self, request: SamplingRequest) -> None:
        """The sampling parameters alone; a subclass adds the limits of its engine."""
        n, max_tokens, temperature, top_p = request.n, request.max_tokens, request.temperature, request.top_p
        if n < 1 or max_tokens < 1:
            raise ValueError(f"n and max_tokens must be >= 1, got n={n}, max_tokens={max_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")

    def _check_prompts(self, prompts: list[list[int]], max_tokens: int) -> None:
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} has no tokens")
            if len(p) + max_tokens > self._max_model_len:
                raise ValueError(
                    f"prompt {i}: {len(p)} prompt tokens + max_tokens {max_tokens} exceed the model's "
                    f"maximum context length of {self._max_model_len} tokens"
                )
            if min(p) < 0 or max(p) >= self._vocab_size:
                raise ValueError(f"prompt {i}: token ids must lie in [0, {self._vocab_size})")

    def _check_weight_names(self, state_dict: Mapping[str, Tensor]) -> None:
        """Every tensor of the model present (a tied alias may be left out), no other."""
        unknown = sorted(set(state_dict) - set(self._template))
        missing = sorted(
            k for k in self._template if k not in state_dict and self._aliases.get(k) not in state_dict
        )
        if unknown or missing:
            raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unknown[:5]}")

    def _check_tensor(self, name: str, tensor: Tensor) -> None:
        """Shape and dtype of the model's `name`, all values finite."""
        want = self._template[name]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            raise ValueError(
                f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                f"the model has {tuple(want.shape)} {want.dtype}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} holds NaN or infinite values")

    # --- handing work to the worker -----------------------------------------------------------------

    async def _submit(self, reply: ReplyT, enqueue: Callable[[ReplyT], None]) -> Any:
        """Queue `reply`'s work with `enqueue` (under the lock), wake the worker, await the answer."""
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            enqueue(reply)
            self._unanswered.add(reply)
            self._cond.notify()
        try:
            return await reply.future
        finally:
            with self._cond:
                self._unanswered.discard(reply)

    def _start_worker(self, name: str) -> None:
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def _run(self) -> None:
        """The worker thread: serve until closed, then fail every reply not answered yet (an answer
        already sent wins: `_settle` leaves a resolved future alone)."""
        error: BaseException = EngineClosed("the engine is closed")
        try:
            self._serve()
        except BaseException as exc:  # a bug or a broken model: fail the waiters rather than hang them
            self._log.exception("%s worker died", self.engine_label)
            error = EngineClosed(f"the engine worker died: {exc!r}")
        with self._cond:
            self._closed = True
            unanswered, self._unanswered = self._unanswered, set()
            self._staged = []
        for reply in unanswered:
            reply.fail(error)

    def _apply(self, stage: StagedWeights) -> None:
        """On the worker thread, between batches: swap `stage` in unless it is not newer."""
        if stage.version <= self._version:
            stage.answer(False)
            return
        try:
            self._swap_in(stage.weights)
        except Exception as exc:
            self._swap_failed(stage, exc)
            return
        self._version = stage.version
        self.stats["swaps"] += 1
        stage.answer(True)
