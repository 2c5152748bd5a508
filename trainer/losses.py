"""Policy-gradient objectives as pure functions of tensors (DESIGN §5).

Per valid response token j of the batch (N tokens), DESIGN §5:

    ratio_j = exp(logp_j − b_j)                       log-ratio clamped to ±LOG_RATIO_CLAMP
    J       = mean_j(ratio_j · adv_j)                 surrogate
    V       = mean_j (ratio_j − r̄)²,  r̄ = mean_j r_j  ratio variance (χ² trust region, budget δ)
    loss    = −J + lam·V                              R²VPO, lam ≥ 0 fixed during the step
    −∂loss/∂logp_j = (1/N) · ratio_j · (adv_j − 2·lam·(ratio_j − r̄))   (the ascent direction)

The §5 options: variance per token (default), per group (r̄ per group) or per sequence (GSPO-style
sequence ratio s_i = exp(mean_t log-ratio)). The robustness study (docs/r2vpo.md) adds: the penalised quantity
(``penalty`` "ratio" r, "log_ratio" log r, "truncated" min(r, c)), an explicit per-sample weight derived
from the budget (``sample_weight="chi2"``: w_i = min(1, δ / mean_t (r_it − 1)²), detached, on the surrogate)
and the split of the loss into its surrogate and penalty parts (``LossOutput.parts``) so the learner can
clip their gradients separately. Baselines with the same contract: PPO-clip / GRPO, DAPO
clip-higher, GSPO, CISPO (stop-gradient clipped IS weight) and unclipped IS.

Shared input contract: ``logp`` [B, T] float (requires grad), ``behavior_logp`` [B, T] (no grad),
``advantages`` [B, T] or [B] (broadcast over T), ``mask`` [B, T] bool. Masked positions may hold anything
(NaN, inf): they are replaced with ``torch.where`` before any ``exp``, so they never reach the loss or
the gradient. Every entry of ``LOSSES`` takes
``fn(logp, behavior_logp, advantages, mask, *, lam=0.0, group_ids=None, var_budget=None, **options)``;
the learner also passes ``proximal_logp`` (its log-probs at the first update of the batch, detached), which
only R²VPO's ``trust_region="proximal"`` reads and every other entry ignores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
WOULD_CLIP_EPS = 0.2  # the PPO ε against which `would_clip_frac` is measured
VAR_LEVELS = ("token", "sequence", "group")
CENTERS = ("mean", "one")
PENALTIES = ("ratio", "log_ratio", "truncated")
SAMPLE_WEIGHTS = ("none", "chi2")
TRUST_REGIONS = ("behavior", "proximal")


@dataclass(frozen=True)
class LossOutput:
    loss: Tensor  # scalar, differentiable
    metrics: dict[str, float]
    ratio_var: Tensor | None = None  # detached scalar V, read by the dual update
    # loss == parts["surrogate"] + parts["penalty"] (R²VPO only): the learner may clip their gradients apart
    parts: dict[str, Tensor] | None = None


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is True; masked entries may hold NaN/inf."""
    x = torch.where(mask, x, 0.0)
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _validate(logp: Tensor, behavior_logp: Tensor, advantages: Tensor, mask: Tensor) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError(f"logp must be a 2-D float tensor [B, T], got {logp.dtype} shape {_shape(logp)}")
    for name, t in (("behavior_logp", behavior_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"shape mismatch: {name} has shape {_shape(t)} but logp has {_shape(logp)}")
    if advantages.shape not in (logp.shape, logp.shape[:1]):
        raise ValueError(
            f"shape mismatch: advantages has shape {_shape(advantages)}, expected [B] = [{logp.shape[0]}] "
            f"or [B, T] = {_shape(logp)} like logp"
        )
    if not bool(mask.any()):
        raise ValueError("empty mask: no valid tokens in the batch")
    adv = advantages.unsqueeze(-1).expand_as(logp) if advantages.dim() == 1 else advantages
    for name, t in (("logp", logp), ("behavior_logp", behavior_logp), ("advantages", adv)):
        if not bool(torch.isfinite(t.detach()[mask]).all()):
            raise ValueError(f"{name} has NaN or inf at a valid (mask=True) position")


def _log_ratio(logp: Tensor, behavior_logp: Tensor, mask: Tensor) -> Tensor:
    log_ratio = torch.where(mask, logp - behavior_logp.detach(), 0.0)  # garbage at masked positions → 0
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _token_adv(advantages: Tensor, mask: Tensor) -> Tensor:
    adv = advantages.unsqueeze(-1).expand_as(mask) if advantages.dim() == 1 else advantages
    return torch.where(mask, adv.detach(), 0.0)


def _group_mean(ratio: Tensor, mask: Tensor, group_ids: Tensor) -> Tensor:
    """Per-token r̄_{g(j)}: token mean of the valid ratios of the token's group, shape [B, 1]."""
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    sums = ratio.new_zeros(groups.numel()).index_add(0, inverse, torch.where(mask, ratio, 0.0).sum(1))
    counts = ratio.new_zeros(groups.numel()).index_add(0, inverse, mask.sum(1).to(ratio.dtype))
    return (sums / counts.clamp(min=1))[inverse].unsqueeze(1)


def _ratio_stats(ratio: Tensor, unit_mask: Tensor, log_ratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Ratio statistics over the valid units (tokens or sequences) and token-level KL(k1, k3)."""
    dtype = torch.promote_types(ratio.dtype, torch.float32)
    r = ratio.detach()[unit_mask].to(dtype)
    log_r = log_ratio.detach()[mask].to(dtype)
    return {
        "ratio_mean": r.mean(),
        "ratio_var": r.var(unbiased=False),
        "ratio_max": r.max(),
        "ratio_min": r.min(),
        "ratio_p99": torch.quantile(r, 0.99),
        "ratio_p999": torch.quantile(r, 0.999),
        "ess": r.sum() ** 2 / (r.numel() * (r**2).sum()),
        "would_clip_frac": ((r - 1).abs() > WOULD_CLIP_EPS).to(dtype).mean(),
        "kl_k1": (-log_r).mean(),
        "kl_k3": (torch.expm1(log_r) - log_r).mean(),
    }


def _output(
    loss: Tensor,
    metrics: dict[str, Tensor | float],
    ratio_var: Tensor,
    parts: dict[str, Tensor] | None = None,
) -> LossOutput:
    names = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    stacked = torch.stack([metrics[k].detach().double() for k in names]).tolist()  # one device sync
    values = dict(zip(names, stacked, strict=True))
    floats = {k: float(values.get(k, v)) for k, v in metrics.items()}
    return LossOutput(loss, floats, ratio_var.detach(), parts)


def _sequence_units(log_ratio: Tensor, adv: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence ratio s_i = exp(mean_t log-ratio), sequence advantage (row mean) and valid rows."""
    return torch.exp(masked_mean(log_ratio, mask, dim=1)), masked_mean(adv, mask, dim=1), mask.any(dim=1)


def _penalised(ratio: Tensor, log_ratio: Tensor, penalty: str, clip: float) -> Tensor:
    """The per-unit quantity whose variance is penalised: r, log r or min(r, c) (c only cuts the tail)."""
    if penalty == "log_ratio":
        return log_ratio
    if penalty == "truncated":
        return torch.minimum(ratio, torch.as_tensor(clip, dtype=ratio.dtype))
    return ratio


def _chi2_weight(ratio: Tensor, unit_mask: Tensor, budget: float) -> Tensor:
    """Per-sample weight w_i = min(1, δ / χ²_i), χ²_i = mean over the sample's valid units of (r − 1)².

    Every sample's weighted second moment w_i·χ²_i is then ≤ δ, so the weighted batch meets the budget by
    construction; fresh samples (r ≈ 1) keep weight 1. Detached: it rescales, it does not pull.
    """
    with torch.no_grad():
        dev = torch.where(unit_mask, (ratio - 1) ** 2, 0.0)
        if ratio.dim() == 2:  # tokens: one weight per row
            chi2 = dev.sum(1, keepdim=True) / unit_mask.sum(1, keepdim=True).clamp(min=1)
        else:
            chi2 = dev
        return torch.where(chi2 > budget, budget / chi2.clamp(min=1e-30), torch.ones_like(chi2))


def r2vpo_loss(
    logp: Tensor,
    behavior_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    lam: float = 0.0,
    *,
    var_level: str = "token",
    group_ids: Tensor | None = None,
    var_budget: float | None = None,
    normalize_by_lambda: bool = False,
    center: str = "mean",
    penalty: str = "ratio",
    penalty_clip: float = 2.0,
    sample_weight: str = "none",
    trust_region: str = "behavior",
    proximal_logp: Tensor | None = None,
    stale_weight_cap: float | None = None,
) -> LossOutput:
    """R²VPO: loss = −J + lam·V (DESIGN §5). ``var_level`` picks the unit of the variance; ``center``
    "one" measures V = mean (x − 1)² (mean (log r)² for the log-ratio) instead of around the mean;
    ``normalize_by_lambda`` divides the loss by (1 + lam); ``penalty`` picks x in V = Var(x): the ratio r,
    the log-ratio, or the ratio truncated at ``penalty_clip`` (the surrogate keeps the untruncated r);
    ``sample_weight="chi2"`` multiplies each sample's surrogate by min(1, δ / χ²_i) (needs ``var_budget``);
    ``trust_region="proximal"`` penalises the variance of q = exp(logp − proximal_logp), the ratio to the
    learner's own weights at the start of the batch, while the surrogate keeps the behaviour ratio r as its
    importance weight (decoupled: staleness is reweighted, only this batch's own drift is constrained);
    ``stale_weight_cap`` c (proximal only) bounds that stale part: the surrogate weight becomes
    q · sg(min(π_prox / π_b, c)), truncated importance sampling of the staleness (V-trace style)."""
    _validate(logp, behavior_logp, advantages, mask)
    if var_level not in VAR_LEVELS:
        raise ValueError(f"unknown var_level {var_level!r}; choose one of: {', '.join(VAR_LEVELS)}")
    if center not in CENTERS:
        raise ValueError(f"unknown center {center!r}; choose one of: {', '.join(CENTERS)}")
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}; choose one of: {', '.join(PENALTIES)}")
    if sample_weight not in SAMPLE_WEIGHTS:
        raise ValueError(
            f"unknown sample_weight {sample_weight!r}; choose one of: {', '.join(SAMPLE_WEIGHTS)}"
        )
    if sample_weight == "chi2" and not (var_budget is not None and var_budget > 0):
        raise ValueError("sample_weight='chi2' needs var_budget > 0 (the δ the weights are derived from)")
    if not (math.isfinite(penalty_clip) and penalty_clip > 0):
        raise ValueError(f"penalty_clip must be a finite number > 0, got {penalty_clip}")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if trust_region not in TRUST_REGIONS:
        raise ValueError(f"unknown trust_region {trust_region!r}; choose one of: {', '.join(TRUST_REGIONS)}")
    if trust_region == "proximal" and (proximal_logp is None or proximal_logp.shape != logp.shape):
        raise ValueError(f"trust_region='proximal' needs proximal_logp of shape {_shape(logp)} like logp")
    if stale_weight_cap is not None and not (trust_region == "proximal" and stale_weight_cap >= 1):
        raise ValueError(
            f"stale_weight_cap needs trust_region='proximal' and a cap >= 1, got {stale_weight_cap} "
            f"with trust_region={trust_region!r}"
        )
    if var_level == "group" and (group_ids is None or group_ids.shape != logp.shape[:1]):
        raise ValueError(f"var_level='group' needs group_ids of shape [B] = [{logp.shape[0]}]")
    log_ratio = _log_ratio(logp, behavior_logp, mask)
    adv = _token_adv(advantages, mask)
    if var_level == "sequence":
        ratio, adv, unit_mask = _sequence_units(log_ratio, adv, mask)
        unit_log_ratio = masked_mean(log_ratio, mask, dim=1)
    else:
        ratio, unit_mask, unit_log_ratio = torch.exp(log_ratio), mask, log_ratio
    importance = ratio  # the surrogate's importance weight
    if trust_region == "proximal":  # the penalised ratio q is to the batch-start weights, not the sampler's
        log_q = _log_ratio(logp, proximal_logp, mask)
        unit_log_q = masked_mean(log_q, mask, dim=1) if var_level == "sequence" else log_q
        q = torch.exp(unit_log_q)
        if stale_weight_cap is not None:  # r = q · (π_prox/π_b): keep q's gradient, truncate the stale factor
            stale = torch.exp(unit_log_ratio - unit_log_q).detach().clamp(max=stale_weight_cap)
            importance = q * stale
    else:
        q, unit_log_q = ratio, unit_log_ratio
    x = _penalised(q, unit_log_q, penalty, penalty_clip)
    if center == "one":
        x_bar = torch.zeros_like(x) if penalty == "log_ratio" else torch.ones_like(x)
    elif var_level == "group":
        x_bar = _group_mean(x, mask, group_ids)
    else:
        x_bar = masked_mean(x, unit_mask)  # not detached: the mean is part of the variance
    weight = _chi2_weight(ratio, unit_mask, var_budget) if sample_weight == "chi2" else None
    J = masked_mean(importance * adv if weight is None else weight * importance * adv, unit_mask)
    V = masked_mean((x - x_bar) ** 2, unit_mask)
    scale = 1.0 / (1.0 + lam) if normalize_by_lambda else 1.0
    parts = {"surrogate": -J * scale, "penalty": lam * V * scale}
    loss = parts["surrogate"] + parts["penalty"]
    with torch.no_grad():
        metrics: dict[str, Tensor | float] = {"loss": loss, "surrogate": J}
        metrics |= _ratio_stats(ratio, unit_mask, log_ratio, mask)
        if penalty == "ratio" and trust_region == "behavior":
            metrics["ratio_var"] = V  # the constrained quantity (group / centre options included)
        metrics["penalty_var"] = V
        # sign of the per-unit ascent weight on ∇logp against the advantage's
        dx = q * (q < penalty_clip) if penalty == "truncated" else (q if penalty == "ratio" else 1.0)
        w = 1.0 if weight is None else weight
        coef = w * importance * adv - 2 * lam * (x - x_bar) * dx
        metrics["sign_flip_frac"] = masked_mean((coef * adv < 0).to(V.dtype), unit_mask)
        if weight is not None:
            rows = unit_mask.any(1) if unit_mask.dim() == 2 else unit_mask
            flat = weight.reshape(weight.shape[0], -1)[:, 0][rows]
            metrics |= {"sample_weight_mean": flat.mean(), "sample_weight_min": flat.min()}
        metrics["lam"] = float(lam)
        if var_budget is not None:
            metrics["var_minus_budget"] = V - var_budget
    return _output(loss, metrics, V, parts)


def is_loss(logp: Tensor, behavior_logp: Tensor, advantages: Tensor, mask: Tensor) -> LossOutput:
    """Unclipped importance sampling: loss = −mean_j(ratio_j · adv_j), i.e. R²VPO with lam = 0."""
    return r2vpo_loss(logp, behavior_logp, advantages, mask, 0.0)


def _check_eps(eps_low: float, eps_high: float) -> None:
    if not (0.0 <= eps_low <= 1.0 and eps_high >= 0.0):
        raise ValueError(f"need 0 <= eps_low <= 1 and eps_high >= 0, got {eps_low}, {eps_high}")


def _clipped_surrogate(
    ratio: Tensor, adv: Tensor, unit_mask: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor]:
    """mean min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) and the units whose clipped branch is active."""
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    surrogate = masked_mean(torch.minimum(ratio * adv, clipped_ratio * adv), unit_mask)
    clipped = ((ratio > 1 + eps_high) & (adv > 0)) | ((ratio < 1 - eps_low) & (adv < 0))
    return surrogate, clipped


def ppo_clip_loss(
    logp: Tensor,
    behavior_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> LossOutput:
    """PPO / GRPO: loss = −mean_j min(r_j A_j, clip(r_j, 1−ε_low, 1+ε_high) A_j), token-mean."""
    _validate(logp, behavior_logp, advantages, mask)
    _check_eps(eps_low, eps_high)
    log_ratio = _log_ratio(logp, behavior_logp, mask)
    adv = _token_adv(advantages, mask)
    ratio = torch.exp(log_ratio)
    surrogate, clipped = _clipped_surrogate(ratio, adv, mask, eps_low, eps_high)
    loss = -surrogate
    with torch.no_grad():
        metrics: dict[str, Tensor | float] = {"loss": loss, "surrogate": surrogate}
        metrics |= _ratio_stats(ratio, mask, log_ratio, mask)
        metrics["clip_frac"] = masked_mean(clipped.to(ratio.dtype), mask)
    return _output(loss, metrics, metrics["ratio_var"])


def dapo_loss(
    logp: Tensor,
    behavior_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> LossOutput:
    """DAPO clip-higher: PPO-clip with ε_high = 0.28, token-mean."""
    return ppo_clip_loss(logp, behavior_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high)


def gspo_loss(
    logp: Tensor,
    behavior_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps: float = 3e-4,
    eps_high: float | None = None,
) -> LossOutput:
    """GSPO: s_i = exp(mean_t log-ratio of seq i); loss = −mean_i min(s_i A_i, clip(s_i, 1±ε) A_i).
    ``eps_high`` defaults to ``eps`` (the paper uses 3e-4 / 4e-4)."""
    _validate(logp, behavior_logp, advantages, mask)
    eps_high = eps if eps_high is None else eps_high
    _check_eps(eps, eps_high)
    log_ratio = _log_ratio(logp, behavior_logp, mask)
    seq_ratio, seq_adv, rows = _sequence_units(log_ratio, _token_adv(advantages, mask), mask)
    surrogate, clipped = _clipped_surrogate(seq_ratio, seq_adv, rows, eps, eps_high)
    loss = -surrogate
    with torch.no_grad():
        metrics: dict[str, Tensor | float] = {"loss": loss, "surrogate": surrogate}
        metrics |= _ratio_stats(seq_ratio, rows, log_ratio, mask)
        metrics["clip_frac"] = masked_mean(clipped.to(seq_ratio.dtype), rows)
    return _output(loss, metrics, metrics["ratio_var"])


def cispo_loss(
    logp: Tensor,
    behavior_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 1.0,
    eps_high: float = 0.28,
) -> LossOutput:
    """CISPO: loss = −mean_j sg(clip(r_j, 1−ε_low, 1+ε_high)) · A_j · logp_j; every token keeps a gradient.
    ε_low = 1 means no lower clip (MiniMax-M1)."""
    _validate(logp, behavior_logp, advantages, mask)
    _check_eps(eps_low, eps_high)
    log_ratio = _log_ratio(logp, behavior_logp, mask)
    adv = _token_adv(advantages, mask)
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(1 - eps_low, 1 + eps_high).detach()
    loss = -masked_mean(weight * adv * torch.where(mask, logp, 0.0), mask)
    with torch.no_grad():
        metrics: dict[str, Tensor | float] = {"loss": loss, "surrogate": masked_mean(ratio * adv, mask)}
        metrics |= _ratio_stats(ratio, mask, log_ratio, mask)
        metrics["clip_frac"] = masked_mean((weight != ratio).to(ratio.dtype), mask)
    return _output(loss, metrics, metrics["ratio_var"])


# --- registry: one call signature for every algorithm, so the learner is blind to which one runs ---

LossFn = Callable[..., LossOutput]


def _r2vpo(logp, behavior_logp, advantages, mask, *, lam=0.0, group_ids=None, var_budget=None, **options):
    if options.get("trust_region", "behavior") == "behavior":
        options.pop("proximal_logp", None)  # only the proximal trust region reads it
    return r2vpo_loss(
        logp, behavior_logp, advantages, mask, lam, group_ids=group_ids, var_budget=var_budget, **options
    )


def _without_dual(fn: LossFn) -> LossFn:
    """Adapter for objectives with no dual variable: ignores lam and group_ids, reports V − budget."""

    def adapter(logp, behavior_logp, advantages, mask, *, lam=0.0, group_ids=None, var_budget=None, **opts):
        del lam, group_ids  # no dual variable, no group-centred variance
        opts.pop("proximal_logp", None)  # no trust region of their own to decouple
        out = fn(logp, behavior_logp, advantages, mask, **opts)
        if var_budget is None:
            return out
        metrics = {**out.metrics, "var_minus_budget": out.metrics["ratio_var"] - var_budget}
        return LossOutput(out.loss, metrics, out.ratio_var)

    adapter.__name__ = adapter.__qualname__ = f"{fn.__name__}_adapter"
    adapter.__doc__ = fn.__doc__
    return adapter


LOSSES: dict[str, LossFn] = {
    "r2vpo": _r2vpo,
    "grpo": _without_dual(ppo_clip_loss),
    "ppo": _without_dual(ppo_clip_loss),
    "dapo": _without_dual(dapo_loss),
    "gspo": _without_dual(gspo_loss),
    "cispo": _without_dual(cispo_loss),
    "is": _without_dual(is_loss),
}


def get_loss(name: str) -> LossFn:
    """The registered loss called ``name``, with the common signature (see module docstring)."""
    if name not in LOSSES:
        raise ValueError(f"unknown algorithm {name!r}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name]
