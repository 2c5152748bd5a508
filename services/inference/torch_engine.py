"""The torch inference engine: `trainer.policy.Policy.sample` behind a batching worker thread.

Behaviour log-probs come from the same code as the learner's (`Policy`), so the only mismatch between the
two is floating-point noise. One worker thread owns the model:

- Requests are split into chunks of at most `max_batch_size` sequences when they arrive (prompt-major, each
  prompt repeated `n` times). The worker takes every queued chunk that fits into one batch, groups the
  chunks by (max_tokens, temperature, top_p) and samples each group with one `Policy.sample` call; a request
  with a `seed` is sampled on its own with its own `torch.Generator`, so its samples do not depend on what
  else was queued. Results go back to the waiting coroutine with `loop.call_soon_threadsafe`.
- Weight updates are staged and applied by the worker between batches, so each completion is generated
  by exactly one version and carries that version.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from services.inference.engine import EngineClosed, Generation
from trainer.policy import Policy

log = logging.getLogger("r2vpo.inference.engine")


@dataclass(eq=False)
class _Job:
    """One `generate` call: its rows (prompt-major, each prompt `n` times) and where results go."""

    rows: list[list[int]]
    n: int
    key: tuple[int, float, float]  # (max_tokens, temperature, top_p)
    generator: torch.Generator | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    results: list[Generation | None] = field(default_factory=list)
    done_rows: int = 0
    failed: bool = False


@dataclass(eq=False)
class _Chunk:
    job: _Job
    start: int
    stop: int


@dataclass(eq=False)
class _Stage:
    state_dict: dict[str, Tensor]
    version: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Runs on the event loop: resolve `future` unless its waiter has gone (cancelled)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any, error: BaseException | None
) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(_settle, future, result, error)


class TorchEngine:
    """`InferenceEngine` over a local HF causal-LM directory, on CPU or one GPU."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        max_batch_size: int = 512,
        model_name: str | None = None,
        version: int = 0,
        num_threads: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if num_threads is not None:  # process-wide; fewer threads than cores when services share the CPU
            torch.set_num_threads(num_threads)
        self.policy = Policy.from_pretrained(model_dir, device=device)
        self.model_name = model_name or Path(model_dir).name
        self.max_batch_size = max_batch_size
        self._version = version
        config = self.policy.model.config
        self._max_model_len = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self._vocab_size = int(self.policy.model.get_input_embeddings().weight.shape[0])
        self._template = {k: v.detach().to("meta") for k, v in self.policy.model.state_dict().items()}
        self._aliases = self._tied_aliases()
        self._sampling_rng = torch.Generator(device=self.policy.device)
        self._sampling_rng.seed()
        self._cond = threading.Condition()
        self._chunks: collections.deque[_Chunk] = collections.deque()
        self._staged: list[_Stage] = []
        self._closed = False
        self.stats = {"batches": 0, "sequences": 0, "tokens": 0, "max_batch_sequences": 0, "swaps": 0}
        self._worker = threading.Thread(target=self._run, name="torch-engine", daemon=True)
        self._worker.start()

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

    def encode(self, text: str) -> list[int]:
        return self.policy.encode_prompt(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.policy.decode(token_ids)

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
        self._check_request(prompts, n, max_tokens, temperature, top_p, seed)
        if not prompts:
            return []
        loop = asyncio.get_running_loop()
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.policy.device)
            generator.manual_seed(seed)
        rows = [list(p) for p in prompts for _ in range(n)]
        job = _Job(
            rows, n, (max_tokens, float(temperature), float(top_p)), generator, loop, loop.create_future()
        )
        job.results = [None] * len(rows)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            for start in range(0, len(rows), self.max_batch_size):
                self._chunks.append(_Chunk(job, start, min(start + self.max_batch_size, len(rows))))
            self._cond.notify()
        return await job.future

    async def load_weights(self, state_dict: Mapping[str, Tensor], version: int) -> bool:
        if version <= self._version:
            return False
        checked = await asyncio.to_thread(self._check_weights, state_dict)
        loop = asyncio.get_running_loop()
        stage = _Stage(checked, version, loop, loop.create_future())
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            self._staged.append(stage)
            self._cond.notify()
        return await stage.future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout=30)

    # --- checks ------------------------------------------------------------------------------------

    def _check_request(
        self,
        prompts: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> None:
        if n < 1 or max_tokens < 1:
            raise ValueError(f"n and max_tokens must be >= 1, got n={n}, max_tokens={max_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if seed is not None and not 0 <= seed < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
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

    def _tied_aliases(self) -> dict[str, str]:
        """Names that share storage with an earlier name (tied embeddings): {alias: name}."""
        seen: dict[int, str] = {}
        aliases = {}
        for name, tensor in self.policy.model.state_dict().items():
            ptr = tensor.data_ptr()
            if ptr in seen:
                aliases[name] = seen[ptr]
            else:
                seen[ptr] = name
        return aliases

    def _check_weights(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every tensor present (a tied alias may be left out), shapes and dtypes equal, all finite."""
        unknown = sorted(set(state_dict) - set(self._template))
        missing = sorted(
            k for k in self._template if k not in state_dict and self._aliases.get(k) not in state_dict
        )
        if unknown or missing:
            raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unknown[:5]}")
        out = {}
        for name, tensor in state_dict.items():
            want = self._template[name]
            if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
                raise ValueError(
                    f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                    f"the model has {tuple(want.shape)} {want.dtype}"
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name} holds NaN or infinite values")
            out[name] = tensor.detach().to(self.policy.device)
        return out

    # --- the worker thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._chunks and not self._staged and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        break
                    staged, self._staged = self._staged, []
                    batch = [] if staged else self._take_batch()
                for stage in staged:
                    self._apply(stage)
                if batch:
                    self._run_batch(batch)
        except BaseException as exc:  # pragma: no cover - a bug; fail the waiters rather than hang them
            log.exception("torch engine worker died")
            error: BaseException = EngineClosed(f"the engine worker died: {exc!r}")
        else:
            error = EngineClosed("the engine is closed")
        with self._cond:
            self._closed = True
            chunks, staged = list(self._chunks), self._staged
            self._chunks.clear()
            self._staged = []
        for job in {c.job for c in chunks}:
            _deliver(job.loop, job.future, None, error)
        for stage in staged:
            _deliver(stage.loop, stage.future, None, error)

    def _take_batch(self) -> list[_Chunk]:
        """Whole chunks in arrival order while they fit into `max_batch_size` rows (at least one)."""
        batch: list[_Chunk] = []
        rows = 0
        while self._chunks:
            chunk = self._chunks[0]
            size = chunk.stop - chunk.start
            if batch and rows + size > self.max_batch_size:
                break
            self._chunks.popleft()
            if chunk.job.failed or chunk.job.future.cancelled():
                continue
            batch.append(chunk)
            rows += size
        return batch

    def _apply(self, stage: _Stage) -> None:
        if stage.version <= self._version:
            _deliver(stage.loop, stage.future, False, None)
            return
        try:
            with torch.no_grad():
                self.policy.model.load_state_dict(stage.state_dict, strict=False)
        except Exception as exc:  # shapes were checked; anything else is reported to the caller
            _deliver(stage.loop, stage.future, None, exc)
            return
        self._version = stage.version
        self.stats["swaps"] += 1
        _deliver(stage.loop, stage.future, True, None)

    def _run_batch(self, batch: list[_Chunk]) -> None:
        """Sample every group of the batch; deliver each job once all its rows are done."""
        version = self._version
        groups: dict[Any, list[_Chunk]] = {}
        for chunk in batch:
            seeded = chunk.job.generator is not None
            groups.setdefault(("seeded", id(chunk)) if seeded else chunk.job.key, []).append(chunk)
        for chunks in groups.values():
            max_tokens, temperature, top_p = chunks[0].job.key
            rows = [row for c in chunks for row in c.job.rows[c.start : c.stop]]
            generator = chunks[0].job.generator or self._sampling_rng
            try:
                samples = self.policy.sample(
                    rows, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, generator=generator
                )
            except Exception as exc:
                log.exception("sampling failed for %d rows", len(rows))
                for job in {c.job for c in chunks}:
                    job.failed = True
                    _deliver(job.loop, job.future, None, exc)
                continue
            self.stats["tokens"] += sum(len(s.token_ids) for s in samples)
            offset = 0
            for c in chunks:
                job = c.job
                for i in range(c.start, c.stop):
                    s = samples[offset]
                    job.results[i] = Generation(s.token_ids, s.logprobs, s.finish_reason, version)
                    offset += 1
                job.done_rows += c.stop - c.start
                if job.done_rows == len(job.rows) and not job.failed:
                    per_prompt = [job.results[k : k + job.n] for k in range(0, len(job.rows), job.n)]
                    _deliver(job.loop, job.future, per_prompt, None)
        self.stats["batches"] += 1
        self.stats["sequences"] += sum(c.stop - c.start for c in batch)
        self.stats["max_batch_sequences"] = max(
            self.stats["max_batch_sequences"], sum(c.stop - c.start for c in batch)
        )
