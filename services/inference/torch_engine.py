"""The torch inference engine: `trainer.policy.Policy.sample` behind a batching worker thread.

Behaviour log-probs come from the same code as the learner's (`Policy`), so the only mismatch between the
two is floating-point noise. One worker thread owns the model:

- Requests are split into chunks of at most `max_batch_size` sequences when they arrive (prompt-major, each
  prompt repeated `n` times). The worker takes every queued chunk that fits into one batch, groups the
  chunks by (max_tokens, temperature, top_p) and samples each group with one `Policy.sample` call. A request
  with a `seed` shares that call but draws its tokens from its own `torch.Generator` (a run of rows of
  `Policy.sample`), so its draws do not depend on what else was queued and concurrent seeded requests (the
  rollout workers send a seed with every request) still batch. Its logits can differ from a lone run's by
  floating-point noise of the batch's shape, so a near-tie may rarely sample differently; alone it is
  exactly reproducible. Results go back to the waiting coroutine with `loop.call_soon_threadsafe`.
- Weight updates are staged and applied by the worker between batches, so each completion is generated
  by exactly one version and carries that version.

The worker thread, the staging of weights and the checks it shares with `VllmEngine` live in
`services.inference.threaded_engine`.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from services.inference.engine import Generation
from services.inference.threaded_engine import Reply, SamplingRequest, ThreadedEngine
from trainer.policy import Policy

log = logging.getLogger("r2vpo.inference.engine")


@dataclass(eq=False)
class _Job(Reply):
    """One `generate` call: its rows (prompt-major, each prompt `n` times) and where results go."""

    rows: list[list[int]]
    n: int
    key: tuple[int, float, float]  # (max_tokens, temperature, top_p)
    generator: torch.Generator | None
    results: list[Generation | None] = field(default_factory=list)
    done_rows: int = 0
    failed: bool = False


@dataclass(eq=False)
class _Chunk:
    job: _Job
    start: int
    stop: int


class TorchEngine(ThreadedEngine):
    """`InferenceEngine` over a local HF causal-LM directory, on CPU or one GPU."""

    engine_label = "torch engine"
    _log = log

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
        super().__init__(max_batch_size=max_batch_size, version=version)
        if num_threads is not None:  # process-wide; fewer threads than cores when services share the CPU
            torch.set_num_threads(num_threads)
        self.policy = Policy.from_pretrained(model_dir, device=device)
        self.model_name = model_name or Path(model_dir).name
        config = self.policy.model.config
        self._max_model_len = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self._vocab_size = int(self.policy.model.get_input_embeddings().weight.shape[0])
        self._template = {k: v.detach().to("meta") for k, v in self.policy.model.state_dict().items()}
        self._aliases = self._tied_aliases()
        self._sampling_rng = torch.Generator(device=self.policy.device)
        self._sampling_rng.seed()
        self._chunks: collections.deque[_Chunk] = collections.deque()
        self.stats = {"batches": 0, "sequences": 0, "tokens": 0, "max_batch_sequences": 0, "swaps": 0}
        self._start_worker("torch-engine")

    # --- the InferenceEngine interface (the rest is `ThreadedEngine`'s) ------------------------------

    def encode(self, text: str) -> list[int]:
        return self.policy.encode_prompt(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.policy.decode(token_ids)

    async def _generate(self, request: SamplingRequest) -> list[list[Generation]]:
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.policy.device)
            generator.manual_seed(request.seed)
        rows = [list(p) for p in request.prompts for _ in range(request.n)]
        key = (request.max_tokens, float(request.temperature), float(request.top_p))
        job = _Job(rows, request.n, key, generator)
        job.results = [None] * len(rows)
        return await self._submit(job, self._enqueue)

    def _enqueue(self, job: _Job) -> None:
        for start in range(0, len(job.rows), self.max_batch_size):
            self._chunks.append(_Chunk(job, start, min(start + self.max_batch_size, len(job.rows))))

    # --- checks ------------------------------------------------------------------------------------

    def _check_sampling(self, request: SamplingRequest) -> None:
        super()._check_sampling(request)
        if request.seed is not None and not 0 <= request.seed < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {request.seed}")

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
        self._check_weight_names(state_dict)
        out = {}
        for name, tensor in state_dict.items():
            self._check_tensor(name, tensor)
            out[name] = tensor.detach().to(self.policy.device)
        return out

    # --- the worker thread ---------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._chunks and not self._staged and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                staged, self._staged = self._staged, []
                batch = [] if staged else self._take_batch()
            for stage in staged:
                self._apply(stage)
            if batch:
                self._run_batch(batch)

    def _swap_in(self, weights: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.policy.model.load_state_dict(weights, strict=False)

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

    def _run_batch(self, batch: list[_Chunk]) -> None:
        """Sample every group of the batch; deliver each job once all its rows are done."""
        version = self._version
        groups: dict[tuple[int, float, float], list[_Chunk]] = {}
        for chunk in sorted(batch, key=lambda c: c.job.generator is not None):  # unseeded ones: one run
            groups.setdefault(chunk.job.key, []).append(chunk)
        for (max_tokens, temperature, top_p), chunks in groups.items():
            rows = [row for c in chunks for row in c.job.rows[c.start : c.stop]]
            generator = self._generator(chunks, temperature)
            try:
                samples = self.policy.sample(
                    rows, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, generator=generator
                )
            except Exception as exc:
                log.exception("sampling failed for %d rows", len(rows))
                for job in {c.job for c in chunks}:
                    job.failed = True
                    job.fail(exc)
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
                    job.answer(per_prompt)
        self.stats["batches"] += 1
        self.stats["sequences"] += sum(c.stop - c.start for c in batch)
        self.stats["max_batch_sequences"] = max(
            self.stats["max_batch_sequences"], sum(c.stop - c.start for c in batch)
        )

    def _generator(
        self, chunks: list[_Chunk], temperature: float
    ) -> torch.Generator | list[tuple[int, torch.Generator]]:
        """The shared generator, unless a seeded request is among `chunks`: then rows per generator."""
        if temperature == 0 or all(c.job.generator is None for c in chunks):
            return self._sampling_rng
        by_generator = itertools.groupby(chunks, key=lambda c: c.job.generator or self._sampling_rng)
        return [(sum(c.stop - c.start for c in run), generator) for generator, run in by_generator]
