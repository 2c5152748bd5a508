"""The learner step, blind to the algorithm (prime-rl's split).

It turns trajectory groups into tensors, asks the policy for the current log-probs, looks the objective up in
the loss registry by name and hands every objective the same inputs. R²VPO's dual variable λ is the only
algorithm state it keeps, and it is updated once per optimizer step (or once per batch) from the detached
ratio variance. Per-algorithm defaults of ``loss_options``, ``dual`` and ``grad_clip_penalty`` live in one
small table (``ALGO_DEFAULTS``), filled in when a ``LearnerConfig`` is validated (so config.json holds the
resolved values); anything the input sets explicitly wins over them.

When the loss returns its two parts (R²VPO: surrogate and λ·penalty) and λ > 0, the learner backpropagates
them separately to log the pre-clip gradient norm of each (``grad_norm_surrogate``, ``grad_norm_penalty``);
with ``grad_clip_penalty`` set it also clips each part to its own norm (surrogate to ``grad_clip``) and sums.

An update with NaN/inf inputs, log-probs, loss, V̂ or gradient norm is never applied, nor are the batch's later
ones. If none was applied, ``train_on`` reports the batch skipped (``StepResult.skipped``, ``skip_reason``):
weights, optimizer, λ, version and step unchanged, groups not kept for replay; the caller decides (the service
dead-letters them, the sync trainer moves on). Else the batch is trained and its metrics count the skip.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from client.schemas import TrajectoryGroup
from trainer.advantages import group_advantages
from trainer.device import check_device_spec, resolve_device
from trainer.dual import DualAscent
from trainer.losses import get_loss, masked_mean
from trainer.replay import ReplayBuffer, ReplayConfig
from trainer.staleness import (
    StalenessConfig,
    effective_max_lag,
    is_admissible,
    lag_of,
    lag_weights,
    staleness_histogram,
)

DUAL_ALGOS = {"r2vpo"}

# Per-algorithm defaults (docs/r2vpo.md has the evidence); explicit config values override them.
# R²VPO: (1) penalise the variance of the log-ratio: its gradient grows like log r, not r², and ≈ Var(r) near
# r = 1, so δ = ε² keeps its meaning; (2) clip the penalty's gradient to its own norm (0.5) apart from the
# surrogate's (grad_clip), so λ·V can never take more than a third of the step when λ integrates an
# infeasible budget under stale data (the measured failure: penalty ≈ 80% of the clipped update at lag 8).
ALGO_DEFAULTS: dict[str, dict[str, Any]] = {
    "r2vpo": {
        "loss_options": {"penalty": "log_ratio"},
        "dual": {"mode": "additive", "lr": 0.1, "budget": 0.04, "update_every": "step"},
        "grad_clip_penalty": 0.5,
    },
}


class DualConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget: float = Field(0.04, gt=0, description="δ, the ratio-variance budget (ε² for ε = 0.2)")
    lr: float = Field(0.1, ge=0, description="η_λ, the dual step size")
    lam_max: float = Field(10.0, ge=0)
    lam_init: float = Field(0.0, ge=0)
    mode: Literal["additive", "multiplicative", "pid"] = "additive"
    lam_floor: float = Field(1e-3, gt=0, description="multiplicative: the floor λ starts from")
    ema: float = Field(0.0, ge=0, lt=1, description="EMA factor of V̂ before the dual step (0 = raw V̂)")
    kp: float = Field(0.0, ge=0, description="pid: proportional gain on V̂ − δ")
    kd: float = Field(0.0, ge=0, description="pid: derivative gain (rises of V̂ − δ only)")
    update_every: Literal["step", "batch"] = Field(
        "step", description="dual step after every optimizer step, or once per batch from the batch's mean V̂"
    )


class LearnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algo: str = Field("r2vpo", description="objective: r2vpo | grpo | ppo | dapo | gspo | cispo | is")
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    grad_clip_penalty: float | None = Field(
        None,
        gt=0,
        description="clip the penalty's gradient to this norm and the surrogate's to grad_clip apart",
    )
    updates_per_batch: int = Field(1, ge=1, description="optimizer steps on each batch (data reuse)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; log-probs use the same")
    advantage: Literal["grpo", "drgrpo"] = "grpo"
    filter_zero_variance: bool = Field(False, description="drop groups whose rewards are all equal (DAPO)")
    dual: DualConfig = Field(default_factory=DualConfig)
    loss_options: dict[str, Any] = Field(default_factory=dict, description="extra keywords of the loss")
    staleness: StalenessConfig = Field(default_factory=StalenessConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    device: str = Field("cpu", description="where the policy trains: cpu | cuda | cuda:N | auto")

    @field_validator("device")
    @classmethod
    def _device_spec(cls, value: str) -> str:
        return check_device_spec(value)  # spelling only: whether it exists is checked at start

    @model_validator(mode="before")
    @classmethod
    def _algo_defaults(cls, data: Any) -> Any:
        """Fill in ``ALGO_DEFAULTS`` where the input sets nothing, so a dumped config is the resolved one."""
        if not isinstance(data, dict):
            return data
        defaults = ALGO_DEFAULTS.get(data.get("algo", "r2vpo"))
        if not defaults:
            return data
        data = dict(data)
        data["loss_options"] = {**defaults.get("loss_options", {}), **(data.get("loss_options") or {})}
        dual = data.get("dual") or {}
        if isinstance(dual, DualConfig):
            dual = dual.model_dump(exclude_unset=True)
        data["dual"] = {**defaults.get("dual", {}), **dual}
        if "grad_clip_penalty" in defaults:
            data.setdefault("grad_clip_penalty", defaults["grad_clip_penalty"])
        return data


@dataclass
class Batch:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    behavior_logp: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] bool
    advantages: torch.Tensor  # [B]
    rewards: torch.Tensor  # [B]
    lags: torch.Tensor  # [B] long
    group_index: torch.Tensor  # [B] long
    zero_var_groups: int

    def to(self, device: torch.device) -> Batch:
        names = ("behavior_logp", "mask", "advantages", "rewards", "lags", "group_index")
        return dataclasses.replace(self, **{n: getattr(self, n).to(device) for n in names})


@dataclass
class StepResult:
    metrics: dict[str, Any]
    trained: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not applied: the batch's update was not finite
    skip_reason: str | None = None


def build_batch(groups: list[TrajectoryGroup], version: int, advantage: str) -> Batch:
    prompt_ids, completion_ids, rewards, lags, group_index, advantages = [], [], [], [], [], []
    zero_var = 0
    for gi, group in enumerate(groups):
        adv = group_advantages(torch.tensor([group.rewards], dtype=torch.float32), kind=advantage)
        zero_var += int(adv.zero_var_groups.sum())
        advantages.append(adv.advantages[0])
        for c in group.completions:
            prompt_ids.append(group.prompt_token_ids)
            completion_ids.append(c.token_ids)
            rewards.append(c.reward)
            lags.append(lag_of(version, c.policy_version))
            group_index.append(gi)
    width = max(len(c) for c in completion_ids)
    behavior = torch.zeros(len(completion_ids), width)
    mask = torch.zeros(len(completion_ids), width, dtype=torch.bool)
    row = 0
    for group in groups:
        for c in group.completions:
            behavior[row, : len(c.token_ids)] = torch.tensor(c.behavior_logprobs)
            mask[row, : len(c.token_ids)] = True
            row += 1
    return Batch(
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        behavior_logp=behavior,
        mask=mask,
        advantages=torch.cat(advantages),
        rewards=torch.tensor(rewards),
        lags=torch.tensor(lags),
        group_index=torch.tensor(group_index),
        zero_var_groups=zero_var,
    )


class Learner:
    """Owns the optimizer, the dual variable and the version counter of one policy."""

    def __init__(self, policy: Any, config: LearnerConfig, *, seed: int = 0) -> None:
        self.device = resolve_device(config.device)  # DeviceUnavailable before anything is built
        if getattr(policy, "device", self.device) != self.device:  # callers load it there; else move it
            policy.model.to(self.device)
            policy.device = self.device
        self.policy = policy
        self.config = config
        self.loss_fn = get_loss(config.algo)
        self.optimizer = torch.optim.AdamW(
            policy.model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.dual = DualAscent(**config.dual.model_dump(exclude={"update_every"}))
        self.replay = ReplayBuffer(config.replay)
        self.max_lag = effective_max_lag(config.algo, config.staleness)
        self.rng = random.Random(seed)
        self.version = 0
        self.step = 0

    # -- state for checkpoints --------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"version": self.version, "step": self.step, "dual": self.dual.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.step = int(state["step"])
        self.dual.load_state_dict(state["dual"])

    # -- one batch --------------------------------------------------------------------------------
    def train_on(self, groups: list[TrajectoryGroup]) -> StepResult:
        """Train on fresh groups (plus replayed ones); returns metrics and which group ids were used."""
        started = time.perf_counter()
        admitted, dropped = [], []
        for g in groups:
            (
                admitted if is_admissible(lag_of(self.version, g.policy_version), self.max_lag) else dropped
            ).append(g)
        if self.config.filter_zero_variance:
            informative = [g for g in admitted if len(set(g.rewards)) > 1]
            dropped += [g for g in admitted if len(set(g.rewards)) <= 1]
            admitted = informative
        self.replay.evict_older_than(self.version)
        replayed = self.replay.sample(self.rng, exclude={g.group_id for g in admitted}) if admitted else []
        batch_groups = admitted + replayed
        metrics: dict[str, Any] = {
            "groups_in": len(groups),
            "groups_dropped": len(dropped),
            "groups_replayed": len(replayed),
        }
        if not batch_groups:
            metrics["version"] = self.version
            return StepResult(metrics=metrics, dropped=[g.group_id for g in dropped])
        try:
            batch = build_batch(batch_groups, self.version, self.config.advantage).to(self.device)
        except ValueError as exc:  # data no float32 batch can hold, e.g. rewards beyond its range
            reason = f"non-finite batch: {exc} (step {self.step}, version {self.version})"
            metrics |= {"updates_applied": 0, "nonfinite_updates": 1, "nonfinite_reason": reason}
        else:
            metrics |= self._update(batch)
        if not metrics["updates_applied"]:  # nothing applied: not trained, not kept for replay
            metrics["version"] = self.version
            ids, stale = [g.group_id for g in admitted], [g.group_id for g in dropped]
            return StepResult(metrics, dropped=stale, skipped=ids, skip_reason=metrics["nonfinite_reason"])
        self.replay.add(admitted)
        metrics |= {
            "version": self.version,
            "step": self.step,
            "samples": int(batch.mask.shape[0]),
            "tokens": int(batch.mask.sum()),
            "reward_mean": float(batch.rewards.mean()),
            "zero_var_group_frac": batch.zero_var_groups / len(batch_groups),
            "staleness_histogram": staleness_histogram(batch.lags.tolist()),
            "learner_s": time.perf_counter() - started,
        }
        tokens_trained = metrics["tokens"] * metrics["updates_applied"]
        metrics["learner_tokens_per_s"] = tokens_trained / metrics["learner_s"]
        return StepResult(
            metrics=metrics, trained=[g.group_id for g in admitted], dropped=[g.group_id for g in dropped]
        )

    def _update(self, batch: Batch) -> dict[str, Any]:
        """The batch's optimizer steps, up to the first non-finite one (not applied, `nonfinite_reason`)."""
        cfg = self.config
        weights = lag_weights(batch.lags, cfg.staleness.lag_decay)
        adv = (batch.advantages * weights)[:, None].expand_as(batch.behavior_logp)
        uses_dual = cfg.algo in DUAL_ALGOS
        per_batch_dual = uses_dual and cfg.dual.update_every == "batch"
        variances: list[torch.Tensor] = []
        metrics: dict[str, Any] = {}
        proximal: torch.Tensor | None = None
        inputs = {"advantages": adv[batch.mask], "behaviour log-probs": batch.behavior_logp[batch.mask]}
        applied, what = 0, _first_nonfinite(inputs)  # e.g. rewards or log-probs beyond float32's range
        for update in range(cfg.updates_per_batch if what is None else 0):
            lam = self.dual.lam if uses_dual else 0.0
            out = self.policy.token_logprobs(
                batch.prompt_ids, batch.completion_ids, temperature=cfg.temperature, with_entropy=True
            )
            if (what := _first_nonfinite({"log-probs of the policy": out.logp[batch.mask]})) is not None:
                break
            if proximal is None:
                proximal = out.logp.detach()  # the batch-start weights: the proximal policy
            result = self.loss_fn(
                out.logp,
                batch.behavior_logp,
                adv,
                batch.mask,
                lam=lam,
                group_ids=batch.group_index,
                var_budget=cfg.dual.budget if uses_dual else None,
                proximal_logp=proximal,
                **cfg.loss_options,
            )
            self.optimizer.zero_grad(set_to_none=True)
            grad_metrics = self._backward(result, lam)
            parts = {"gradient norm": grad_metrics["grad_norm"], "loss": result.loss.detach()}
            parts["ratio variance"] = result.ratio_var if uses_dual else None  # what the dual step reads
            if (what := _first_nonfinite(parts)) is not None:
                self.optimizer.zero_grad(set_to_none=True)  # the poisoned gradients never reach the weights
                break
            self.optimizer.step()
            if uses_dual and result.ratio_var is not None:
                if per_batch_dual:
                    variances.append(result.ratio_var)
                else:
                    self.dual.update(result.ratio_var)
            self.version += 1
            self.step += 1
            applied += 1
            if update == 0:
                metrics |= self._first_update_metrics(out, batch, weights)
            metrics |= result.metrics
            metrics |= grad_metrics
        if per_batch_dual and variances:
            self.dual.update(torch.stack(variances).mean())
        metrics["lam_next"] = self.dual.lam if uses_dual else 0.0
        if uses_dual and self.dual.smoothed_var is not None:
            metrics["dual_var"] = self.dual.smoothed_var
        metrics |= {"updates_applied": applied, "nonfinite_updates": int(what is not None)}
        if what is not None:
            where = f"step {self.step}, version {self.version}, update {applied + 1}/{cfg.updates_per_batch}"
            metrics["nonfinite_reason"] = f"non-finite {what} ({where})"
        return metrics

    def _backward(self, result: Any, lam: float) -> dict[str, float]:
        """Gradients into ``.grad`` with clipping; returns the pre-clip norms (total and per part)."""
        cfg = self.config
        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        parts = result.parts
        if parts is None or lam == 0.0:  # no penalty gradient: one backward pass
            result.loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            return {"grad_norm": norm, "grad_norm_surrogate": norm, "grad_norm_penalty": 0.0}
        g_sur = torch.autograd.grad(parts["surrogate"], params, retain_graph=True, allow_unused=True)
        g_pen = torch.autograd.grad(parts["penalty"], params, allow_unused=True)
        g_sur = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_sur, strict=True)]
        g_pen = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_pen, strict=True)]
        n_sur = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g_sur])))
        n_pen = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g_pen])))
        total = [a + b for a, b in zip(g_sur, g_pen, strict=True)]
        n_tot = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in total])))
        if cfg.grad_clip_penalty is None:  # one joint clip, as with a single backward pass
            scale = min(1.0, cfg.grad_clip / (n_tot + 1e-6))
            grads = [g * scale for g in total]
        else:
            s_sur = min(1.0, cfg.grad_clip / (n_sur + 1e-6))
            s_pen = min(1.0, cfg.grad_clip_penalty / (n_pen + 1e-6))
            grads = [a * s_sur + b * s_pen for a, b in zip(g_sur, g_pen, strict=True)]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        return {"grad_norm": n_tot, "grad_norm_surrogate": n_sur, "grad_norm_penalty": n_pen}

    @staticmethod
    def _first_update_metrics(out: Any, batch: Batch, weights: torch.Tensor) -> dict[str, Any]:
        """Diagnostics measured before the first optimizer step of the batch (weights as sampled)."""
        with torch.no_grad():
            logp, mask = out.logp.detach(), batch.mask
            metrics: dict[str, Any] = {"entropy": float(masked_mean(out.entropy.detach(), mask))}
            fresh = mask & (batch.lags == 0)[:, None]
            if fresh.any():
                # At lag 0 the learner's weights are the sampler's: any difference is engine mismatch.
                delta = (logp - batch.behavior_logp).abs()[fresh]
                metrics |= {
                    "logp_mismatch_mean": float(delta.mean()),
                    "logp_mismatch_max": float(delta.max()),
                }
            log_ratio = torch.where(mask, logp - batch.behavior_logp, 0.0).clamp(-20, 20)
            ratio = torch.exp(log_ratio)
            per_lag = {}
            for lag in sorted(set(batch.lags.tolist())):
                rows = mask & (batch.lags == lag)[:, None]
                r = ratio[rows]
                w = weights[batch.lags == lag][0]
                per_lag[str(lag)] = {
                    "tokens": int(rows.sum()),
                    "ratio_mean": float(r.mean()),
                    "ratio_var": float(r.var(unbiased=False)),
                    "effective_weight": float((r * w).mean()),
                }
            metrics["per_lag"] = per_lag
        return metrics


def _first_nonfinite(values: dict[str, torch.Tensor | float | None]) -> str | None:
    """The name of the first value holding a NaN or inf (None: not checked)."""
    for name, value in values.items():
        if value is not None and not bool(torch.isfinite(torch.as_tensor(value)).all()):
            return name
    return None
