"""learner: tokens/s of Learner.train_on with R²VPO (λ = 0, λ = 1, one joint backward) vs GRPO."""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from typing import Any

from .config import log
from .context import Context
from .machine import loadavg
from .measure import figure, rotated, sync_device


def _to_device_batch(build: Callable, device: str) -> Callable:
    """Wrap `trainer.learner.build_batch` so the batch's tensors live on `device` (the learner leaves them
    on the CPU, which only works for a CPU policy)."""
    import dataclasses

    import torch

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        batch = build(*args, **kwargs)
        moved = {
            f.name: getattr(batch, f.name).to(device)
            for f in dataclasses.fields(batch)
            if isinstance(getattr(batch, f.name), torch.Tensor)
        }
        return dataclasses.replace(batch, **moved)

    return wrapped


def _joint_backward(loss_fn: Callable) -> Callable:
    """`loss_fn` with its `parts` dropped: the learner then backpropagates the total loss once."""
    import dataclasses

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return dataclasses.replace(loss_fn(*args, **kwargs), parts=None)

    return wrapped


def bench_learner(ctx: Context) -> dict[str, Any]:
    import torch

    import trainer.learner as learner_mod
    from trainer.learner import Learner, LearnerConfig
    from trainer.policy import Policy
    from trainer.rollout import generate_groups
    from trainer.task import Task

    which = "large" if ctx.device == "cuda" else "tiny"
    label = ctx.models.label(which)
    model_dir = ctx.models.get(which)
    base = Policy.from_pretrained(model_dir, device=ctx.device)
    task = Task()
    problems = task.sample_train(16, random.Random(0))
    generator = torch.Generator(device=base.device).manual_seed(0)
    max_new_tokens = 8 if ctx.device == "cpu" else 64  # the default task's length; longer on a GPU
    groups = generate_groups(
        base, task, problems, group_size=8, max_new_tokens=max_new_tokens, temperature=1.0, version=0,
        generator=generator,
    )  # fmt: skip
    configs = {
        "grpo": LearnerConfig(algo="grpo"),
        # λ held at 0: the variance is computed and logged, its gradient is zero (one backward pass)
        "r2vpo_lam0": LearnerConfig(algo="r2vpo", dual={"lam_init": 0.0, "lr": 0.0}),
        # λ held at 1: the penalty's gradient is live; the learner then takes two backward passes (one per
        # part, to log each part's gradient norm)
        "r2vpo_lam1": LearnerConfig(algo="r2vpo", dual={"lam_init": 1.0, "lr": 0.0}),
        # the same, with the loss's parts hidden so the learner takes one joint backward pass: the cost of
        # the variance term itself, without the per-part logging
        "r2vpo_lam1_joint": LearnerConfig(algo="r2vpo", dual={"lam_init": 1.0, "lr": 0.0}),
    }
    learners = {}
    for name, cfg in configs.items():
        policy = Policy(copy.deepcopy(base.model), base.tokenizer, device=ctx.device)
        learners[name] = Learner(policy, cfg, seed=0)
    learners["r2vpo_lam1_joint"].loss_fn = _joint_backward(learners["r2vpo_lam1_joint"].loss_fn)
    original = learner_mod.build_batch
    if ctx.device != "cpu":
        learner_mod.build_batch = _to_device_batch(original, ctx.device)
    runs: dict[str, list[float]] = {k: [] for k in configs}
    lams: dict[str, list[float]] = {k: [] for k in configs}
    tokens = 0
    log(f"learner: {label}, 16 groups × 8, {ctx.sizes['learner_reps']} reps, load {loadavg()}")
    try:
        for rep in range(ctx.sizes["learner_reps"] + 1):  # rep 0 warms up
            for name in rotated(tuple(configs), rep):
                learner = learners[name]
                learner.version = learner.step = 0  # every step sees lag-0 groups: none dropped as stale
                sync_device(ctx.device)
                started = time.perf_counter()
                result = learner.train_on(groups)
                sync_device(ctx.device)
                seconds = time.perf_counter() - started
                tokens = result.metrics["tokens"]
                if rep:
                    runs[name].append(tokens / seconds)
                    lams[name].append(result.metrics.get("lam", 0.0))
    finally:
        learner_mod.build_batch = original
    baseline_what = "the same step with GRPO (PPO-clip 0.2), interleaved"
    figures = [
        figure(
            "learner", "r2vpo_lam0_vs_grpo", runs["r2vpo_lam0"], runs["grpo"], unit="tokens/s",
            what=f"Learner.train_on, R²VPO at λ = 0 (variance computed, no penalty gradient), {label}, "
            f"16 groups × 8, {tokens} tokens",
            baseline_what=baseline_what,
        ),
        figure(
            "learner", "r2vpo_lam1_vs_grpo", runs["r2vpo_lam1"], runs["grpo"], unit="tokens/s",
            what=f"Learner.train_on, R²VPO at λ = 1 (penalty gradient live; the learner's two backward "
            f"passes), {label}",
            baseline_what=baseline_what,
        ),
        figure(
            "learner", "r2vpo_lam1_joint_vs_grpo", runs["r2vpo_lam1_joint"], runs["grpo"], unit="tokens/s",
            what=f"R²VPO at λ = 1 with one joint backward pass (parts hidden from the learner), {label}",
            baseline_what=baseline_what,
        ),
    ]  # fmt: skip
    details = {"model": label, "tokens": tokens, "lam_seen": {k: sorted(set(v)) for k, v in lams.items()}}
    return {"figures": figures, "details": details, "runs": runs, "loadavg": loadavg()}
