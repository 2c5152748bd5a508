"""The inference service's core, testable without HTTP: engine lifecycle, completions, weight updates.

`InferenceService` turns an OpenAI-style `CompletionRequest` into engine calls (with the configured limits),
applies weight announcements (fetch → verify sha256 / finiteness / shapes → stage → swap; version <= current
is a no-op, a rejected announcement is remembered and the old weights keep serving), and follows the run's
announcements on Redis, starting with the latest one so that a restarted process serves the newest weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from client.schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    ModelCard,
    ModelList,
    WeightsAnnouncement,
)
from services.inference.engine import EngineClosed, Generation, InferenceEngine
from services.inference.settings import InferenceSettings

log = logging.getLogger("r2vpo.inference")


class ServiceError(Exception):
    """An error with its HTTP status and OpenAI error `type`; mapped to a response once, in the app."""

    def __init__(self, status_code: int, message: str, *, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status_code, self.message, self.kind = status_code, message, kind


class WeightsRejected(ServiceError):
    """A weight announcement that does not fit or cannot be fetched; the old weights keep serving."""

    def __init__(self, message: str, *, status_code: int = 422, transient: bool = False) -> None:
        super().__init__(status_code, message, kind="weights_rejected")
        self.transient = transient


class CompletionBody(CompletionRequest):
    """The request as the route parses it: OpenAI options it cannot honour are refused, not ignored."""

    stream: bool | None = None
    echo: bool | None = None
    stop: str | list[str] | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        return [
            name
            for name in ("stream", "echo", "stop", "suffix")
            if getattr(self, name) not in (None, False, [], "")
        ]


class InferenceMetrics:
    """Prometheus metrics of one app, on its own registry (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, "r2vpo_inference_"
        self.requests = Counter(
            p + "requests_total", "completion requests by HTTP status", ["status"], registry=r
        )
        self.tokens = Counter(p + "generated_tokens_total", "completion tokens generated", registry=r)
        self.latency = Histogram(
            p + "generation_latency_seconds",
            "engine time per completion request",
            buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100),
            registry=r,
        )
        self.version = Gauge(
            p + "policy_version", "policy version served (-1: engine not loaded)", registry=r
        )
        self.swap = Histogram(
            p + "weight_swap_seconds",
            "fetch + verify + swap of one weight update",
            buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30),
            registry=r,
        )
        self.rejections = Counter(
            p + "weight_rejections_total", "weight announcements rejected", ["reason"], registry=r
        )


class InferenceService:
    """Owns the engine (built in the background unless given) and the Redis weight follower."""

    def __init__(self, settings: InferenceSettings, *, engine: InferenceEngine | None = None) -> None:
        settings.check_admin()
        self.settings = settings
        self.engine = engine
        self._owns_engine = engine is None
        self.load_error: str | None = None
        self.metrics = InferenceMetrics()
        self.metrics.version.set_function(lambda: -1 if self.engine is None else self.engine.version)
        self.rejected: dict[tuple[int, str], str] = {}  # (version, sha256) → reason: never retried
        self.caught_up = asyncio.Event()  # first look at Redis done (or not watching)
        self._swap_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.caught_up.is_set()

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._start(), name="inference-start"))

    async def _start(self) -> None:
        if self.engine is None:
            try:
                self.engine = await asyncio.to_thread(self._build_engine)
            except Exception as exc:
                self.load_error = f"{type(exc).__name__}: {exc}"
                log.error("inference engine failed to load: %s", self.load_error)
                return
        log.info("inference engine ready: model %s, version %d", self.engine.model_name, self.engine.version)
        if self.settings.watch_weights:
            self._tasks.append(asyncio.create_task(self._follow_weights(), name="inference-weights"))
        else:
            self.caught_up.set()

    def _build_engine(self) -> InferenceEngine:
        s = self.settings
        if s.model is None:
            from trainer.tiny import ensure_default_policy

            model_dir = ensure_default_policy(progress=False)
        else:
            model_dir = Path(s.model)
        name = s.served_model_name or model_dir.name
        if s.engine == "vllm":
            try:
                from services.inference.vllm_engine import VllmEngine  # type: ignore[import-not-found]
            except ImportError as exc:
                raise RuntimeError(
                    f"engine 'vllm' needs the vllm extra (pip install 'r2vpo[vllm]'): {exc}"
                ) from exc
            return VllmEngine(model_dir, device=s.device, max_batch_size=s.max_batch_size, model_name=name)
        from services.inference.torch_engine import TorchEngine

        return TorchEngine(
            model_dir,
            device=s.device,
            max_batch_size=s.max_batch_size,
            model_name=name,
            num_threads=s.torch_threads,
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.engine is not None and self._owns_engine:
            await asyncio.to_thread(self.engine.close)

    def require_engine(self) -> InferenceEngine:
        if self.engine is None:
            reason = f"failed to load: {self.load_error}" if self.load_error else "is loading"
            raise ServiceError(503, f"the inference engine {reason}", kind="service_unavailable")
        return self.engine

    # --- completions ----------------------------------------------------------------------------------

    def models(self) -> ModelList:
        engine = self.require_engine()
        return ModelList(data=[ModelCard(id=engine.model_name, policy_version=engine.version)])

    def _prompts(self, req: CompletionBody, engine: InferenceEngine) -> list[list[int]]:
        """The request's prompts as token ids, checked against the limits (tokenizes: off the loop)."""
        prompts = self._prompt_ids(req, engine)
        self._check(req, prompts, engine)
        return prompts

    def _prompt_ids(self, req: CompletionRequest, engine: InferenceEngine) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            return [engine.encode(prompt)]
        if not prompt:
            raise ServiceError(400, "prompt must not be empty")
        if all(isinstance(p, str) for p in prompt):
            return [engine.encode(p) for p in prompt]  # type: ignore[arg-type]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return [list(p) for p in prompt]  # type: ignore[union-attr]

    def _check(self, req: CompletionBody, prompts: list[list[int]], engine: InferenceEngine) -> None:
        s = self.settings
        if unsupported := req.unsupported():
            raise ServiceError(400, f"not supported by this server: {', '.join(unsupported)}")
        if req.model is not None and req.model != engine.model_name:
            message = f"model {req.model!r} does not exist; this server serves {engine.model_name!r}"
            raise ServiceError(404, message, kind="model_not_found")
        if req.n > s.max_n:
            raise ServiceError(400, f"n={req.n} exceeds this server's limit of {s.max_n}")
        if req.max_tokens > s.max_tokens_limit:
            raise ServiceError(
                400, f"max_tokens={req.max_tokens} exceeds this server's limit of {s.max_tokens_limit}"
            )
        if len(prompts) * req.n > s.max_n * 1024:
            raise ServiceError(
                413, f"{len(prompts)} prompts x n={req.n} is more than {s.max_n * 1024} sequences"
            )
        for i, p in enumerate(prompts):
            if not p:
                raise ServiceError(400, f"prompt {i} has no tokens")
            if len(p) > s.max_prompt_tokens:
                raise ServiceError(413, f"prompt {i} has {len(p)} tokens; the limit is {s.max_prompt_tokens}")
            if len(p) + req.max_tokens > engine.max_model_len:
                message = (
                    f"prompt {i} has {len(p)} tokens and max_tokens is {req.max_tokens}: more than the "
                    f"model's maximum context length of {engine.max_model_len}"
                )
                raise ServiceError(400, message)
            if min(p) < 0 or max(p) >= engine.vocab_size:
                raise ServiceError(400, f"prompt {i}: token ids must lie in [0, {engine.vocab_size})")

    async def complete(self, req: CompletionBody) -> CompletionResponse:
        """Tokenizing and detokenizing run in worker threads, sampling in the engine's: the event loop only
        parses and routes, so concurrent requests reach the engine together and batch."""
        engine = self.require_engine()
        prompts = await asyncio.to_thread(self._prompts, req, engine)
        started = time.perf_counter()
        try:
            generations = await engine.generate(
                prompts,
                n=req.n,
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
            )
        except ValueError as exc:  # the engine's own checks (limits the service did not know about)
            raise ServiceError(400, str(exc)) from exc
        self.metrics.latency.observe(time.perf_counter() - started)
        response = await asyncio.to_thread(self._response, req, prompts, generations, engine)
        self.metrics.tokens.inc(response.usage.completion_tokens)
        return response

    def _response(
        self,
        req: CompletionBody,
        prompts: list[list[int]],
        generations: list[list[Generation]],
        engine: InferenceEngine,
    ) -> CompletionResponse:
        """The OpenAI-style response: choices prompt-major, `n` per prompt, with their text (detokenizes)."""
        choices = [
            self._choice(k * req.n + j, gen, prompts[k], req.logprobs is not None, engine)
            for k, per_prompt in enumerate(generations)
            for j, gen in enumerate(per_prompt)
        ]
        completion_tokens = sum(len(c.token_ids) for c in choices)
        prompt_tokens = sum(len(p) for p in prompts)
        usage = CompletionUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}", model=engine.model_name, choices=choices, usage=usage
        )

    @staticmethod
    def _choice(
        index: int, gen: Generation, prompt: list[int], with_logprobs: bool, engine: InferenceEngine
    ) -> CompletionChoice:
        logprobs = None
        if with_logprobs:
            tokens = [engine.decode([t]) for t in gen.token_ids]
            offsets = [0]
            for tok in tokens[:-1]:
                offsets.append(offsets[-1] + len(tok))
            logprobs = CompletionLogprobs(
                tokens=tokens, token_logprobs=list(gen.logprobs), text_offset=offsets[: len(tokens)]
            )
        return CompletionChoice(
            index=index,
            text=engine.decode(gen.token_ids),
            finish_reason=gen.finish_reason,
            logprobs=logprobs,
            token_ids=list(gen.token_ids),
            prompt_token_ids=list(prompt),
            policy_version=gen.policy_version,
        )

    # --- weights --------------------------------------------------------------------------------------

    async def apply_weights(self, a: WeightsAnnouncement) -> bool:
        """Fetch, verify, stage, swap; False when `a.version <= version` (no-op). Raises WeightsRejected."""
        from services.weights import WeightsVerificationError, fetch_weights_async, verify_and_load

        engine = self.require_engine()
        async with self._swap_lock:
            if a.version <= engine.version:
                return False
            key = (a.version, a.sha256)
            if key in self.rejected:
                raise WeightsRejected(f"weights v{a.version} were rejected before: {self.rejected[key]}")
            started = time.perf_counter()
            try:
                data = await fetch_weights_async(a)
                state_dict = await asyncio.to_thread(
                    verify_and_load, data, a, expected=engine.state_dict_template()
                )
                changed = await engine.load_weights(state_dict, a.version)
            except (
                WeightsVerificationError,
                ValueError,
            ) as exc:  # the announcement itself is bad: remembered
                self.rejected[key] = str(exc)
                self.metrics.rejections.labels(reason="verification").inc()
                raise WeightsRejected(f"weights v{a.version} rejected: {exc}") from exc
            except EngineClosed:
                raise
            except Exception as exc:  # network trouble: not the announcement's fault, may be retried
                self.metrics.rejections.labels(reason="fetch").inc()
                raise WeightsRejected(
                    f"could not fetch weights v{a.version} from {a.uri}: {exc}",
                    status_code=502,
                    transient=True,
                ) from exc
            if changed:
                self.metrics.swap.observe(time.perf_counter() - started)
                log.info("now serving weights v%d (%.3f s)", a.version, time.perf_counter() - started)
            return changed

    async def _follow_weights(self) -> None:
        """Load the latest announcement, then each newer one; ride out Redis outages with backoff."""
        from services.queue import TrajectoryQueue, connect_redis

        delay, url = 0.5, self.settings.redis_url.get_secret_value()
        while True:
            redis = None
            try:
                redis = await connect_redis(url, attempts=1, log=log)
                queue = TrajectoryQueue(
                    redis, self.settings.run, consumer=f"inference-{uuid.uuid4().hex[:8]}"
                )
                latest = await queue.latest_weights()
                if latest is not None:
                    await self._apply_logged(latest)
                self.caught_up.set()
                delay = 0.5
                watch = queue.watch_weights(self.settings.weights_poll_s, after_version=self.engine.version)
                async with contextlib.aclosing(watch) as announcements:
                    async for a in announcements:
                        await self._apply_logged(a)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down, a transient fetch failure: back off, then look again
                self.caught_up.set()
                log.warning("weight follower: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            finally:
                if redis is not None:
                    with contextlib.suppress(Exception):
                        await redis.aclose()

    async def _apply_logged(self, a: WeightsAnnouncement) -> None:
        """Apply an announcement from Redis; log a rejection (remembered), re-raise a transient failure."""
        if a.version <= self.engine.version or (a.version, a.sha256) in self.rejected:
            return
        try:
            await self.apply_weights(a)
        except WeightsRejected as exc:
            if exc.transient:
                raise
            log.error("rejected weight announcement v%d (%s): %s", a.version, a.uri, exc.message)
