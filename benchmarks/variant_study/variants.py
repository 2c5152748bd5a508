"""The variants of the study: an algorithm plus overrides of `LearnerConfig` (loss options, dual settings,
split gradient clipping, replay), by name; `r2vpo` alone is the default the learner resolves from
`trainer.learner.ALGO_DEFAULTS`, `r2vpo-plain` the DESIGN §5 form."""

from __future__ import annotations

import json
from typing import Any

# name → (algo, LearnerConfig overrides). "r2vpo" is the resolved default; "r2vpo-plain" the DESIGN §5 form.
PLAIN: dict[str, Any] = {
    "loss_options": {
        "penalty": "ratio",
        "center": "mean",
        "var_level": "token",
        "sample_weight": "none",
        "trust_region": "behavior",
    },
    "dual": {"mode": "additive", "lr": 0.1, "ema": 0.0, "update_every": "step"},
    "grad_clip_penalty": None,
}


def _plain(**changes: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(PLAIN))
    for key, value in changes.items():
        if isinstance(value, dict):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


_DECOUPLED = {"penalty": "log_ratio", "trust_region": "proximal", "stale_weight_cap": 2.0}

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # baselines
    "grpo": ("grpo", {}),
    "dapo": ("dapo", {}),
    "cispo": ("cispo", {}),
    "gspo": ("gspo", {}),
    "is": ("is", {}),
    # R²VPO: the learner's default, and the DESIGN §5 form before this study
    "r2vpo": ("r2vpo", {}),
    "r2vpo-plain": ("r2vpo", _plain()),
    "r2vpo-eta1": ("r2vpo", _plain(dual={"lr": 1.0})),
    # scale
    "r2vpo-norm-eta1": ("r2vpo", _plain(dual={"lr": 1.0}, loss_options={"normalize_by_lambda": True})),
    "r2vpo-split-eta1": ("r2vpo", _plain(dual={"lr": 1.0}, grad_clip_penalty=0.5)),
    "r2vpo-split": ("r2vpo", _plain(grad_clip_penalty=0.5)),
    "r2vpo-norm": ("r2vpo", _plain(loss_options={"normalize_by_lambda": True})),
    # robust variance
    "r2vpo-log": ("r2vpo", _plain(loss_options={"penalty": "log_ratio"})),
    "r2vpo-trunc": ("r2vpo", _plain(loss_options={"penalty": "truncated"})),
    "r2vpo-one": ("r2vpo", _plain(loss_options={"center": "one"})),
    "r2vpo-log-eta1": ("r2vpo", _plain(dual={"lr": 1.0}, loss_options={"penalty": "log_ratio"})),
    "r2vpo-trunc-eta1": ("r2vpo", _plain(dual={"lr": 1.0}, loss_options={"penalty": "truncated"})),
    "r2vpo-one-eta1": ("r2vpo", _plain(dual={"lr": 1.0}, loss_options={"center": "one"})),
    "r2vpo-seq": ("r2vpo", _plain(loss_options={"var_level": "sequence"})),
    # the dual
    "r2vpo-mult": ("r2vpo", _plain(dual={"mode": "multiplicative", "lr": 0.1})),
    "r2vpo-ema-eta1": ("r2vpo", _plain(dual={"lr": 1.0, "ema": 0.9})),
    "r2vpo-pid": ("r2vpo", _plain(dual={"mode": "pid", "lr": 0.1, "kp": 1.0, "kd": 0.0, "ema": 0.5})),
    "r2vpo-batch": ("r2vpo", _plain(dual={"update_every": "batch"})),
    "r2vpo-ema": ("r2vpo", _plain(dual={"ema": 0.9})),
    "r2vpo-batch-eta1": ("r2vpo", _plain(dual={"lr": 1.0, "update_every": "batch"})),
    # the reuse side
    "r2vpo-chi2": ("r2vpo", _plain(loss_options={"sample_weight": "chi2"})),
    "r2vpo-chi2-split-eta1": (
        "r2vpo",
        _plain(dual={"lr": 1.0}, loss_options={"sample_weight": "chi2"}, grad_clip_penalty=0.5),
    ),
    "r2vpo-replay": ("r2vpo", _plain(replay={"capacity": 32, "max_age": 8, "groups_per_batch": 8})),
    "grpo-replay": ("grpo", {"replay": {"capacity": 32, "max_age": 8, "groups_per_batch": 8}}),
    # decoupled trust region: penalise the ratio to the batch-start weights, reweight staleness by r
    "r2vpo-prox": ("r2vpo", _plain(loss_options={"trust_region": "proximal"})),
    "r2vpo-prox-eta1": ("r2vpo", _plain(dual={"lr": 1.0}, loss_options={"trust_region": "proximal"})),
    "r2vpo-prox-chi2": (
        "r2vpo",
        _plain(loss_options={"trust_region": "proximal", "sample_weight": "chi2"}),
    ),
    "r2vpo-prox-chi2-split-eta1": (
        "r2vpo",
        _plain(
            dual={"lr": 1.0},
            loss_options={"trust_region": "proximal", "sample_weight": "chi2"},
            grad_clip_penalty=0.5,
        ),
    ),
    # decoupled, bounded: penalise Var(log q) of this batch's own drift (feasible at any lag), split clip,
    # and truncate the stale factor π_prox/π_b of the surrogate's importance weight at 2 (V-trace style)
    "r2vpo-dec": ("r2vpo", {"loss_options": _DECOUPLED}),
    "r2vpo-dec-tight": ("r2vpo", {"loss_options": _DECOUPLED, "dual": {"budget": 0.005, "lr": 1.0}}),
    "r2vpo-dec-mult": (
        "r2vpo",
        {
            "loss_options": _DECOUPLED,
            "dual": {"mode": "multiplicative", "budget": 0.005, "lr": 0.5, "update_every": "batch"},
        },
    ),
    # combinations
    "r2vpo-log-split": ("r2vpo", _plain(loss_options={"penalty": "log_ratio"}, grad_clip_penalty=0.5)),
    "r2vpo-log-split-eta1": (
        "r2vpo",
        _plain(dual={"lr": 1.0}, loss_options={"penalty": "log_ratio"}, grad_clip_penalty=0.5),
    ),
}


def variant_order(variant: str) -> tuple[int, str]:
    """Sort key: the order of VARIANTS, unknown names last (alphabetically)."""
    names = list(VARIANTS)
    return (names.index(variant) if variant in names else len(names), variant)
