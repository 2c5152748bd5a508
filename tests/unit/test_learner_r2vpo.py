"""trainer.learner: split gradient clipping, per-part gradient norms, dual cadence, per-algo defaults."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import trainer.learner as learner_mod
from trainer.learner import Batch, DualConfig, Learner, LearnerConfig


class FakeModel(nn.Module):
    def __init__(self, vocab: int = 6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(torch.randn(vocab, vocab, generator=g))  # next-token logits per token


class FakePolicy:
    """A bigram policy with the `token_logprobs` contract of trainer.policy.Policy."""

    def __init__(self, seed: int = 0) -> None:
        self.model = FakeModel(seed=seed)

    def token_logprobs(self, prompt_ids, completion_ids, *, temperature=1.0, with_entropy=False):
        T = max(len(c) for c in completion_ids)
        logps, entropies = [], []
        for p, c in zip(prompt_ids, completion_ids, strict=True):
            prev = torch.tensor([p[-1], *c[:-1]])
            lp = torch.log_softmax(self.model.logits[prev] / temperature, -1)
            logps.append(nn.functional.pad(lp.gather(1, torch.tensor(c)[:, None])[:, 0], (0, T - len(c))))
            entropies.append(nn.functional.pad(-(lp.exp() * lp).sum(-1).detach(), (0, T - len(c))))
        mask = torch.stack([torch.arange(T) < len(c) for c in completion_ids])
        logp, entropy = torch.stack(logps), torch.stack(entropies)
        return SimpleNamespace(logp=logp, entropy=entropy, mask=mask)


def make_batch(policy: FakePolicy, seed: int = 0, B: int = 8, T: int = 4, drift: float = 0.8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    completions = [torch.randint(6, (T,), generator=g).tolist() for _ in range(B)]
    prompts = [[int(torch.randint(6, (), generator=g))] for _ in range(B)]
    with torch.no_grad():
        logp = policy.token_logprobs(prompts, completions).logp
    behavior = logp + drift * torch.randn(B, T, generator=g)  # a stale sampler: heavy-ish ratios
    return Batch(
        prompt_ids=prompts,
        completion_ids=completions,
        behavior_logp=behavior,
        mask=torch.ones(B, T, dtype=torch.bool),
        advantages=torch.randn(B, generator=g),
        rewards=torch.zeros(B),
        lags=torch.full((B,), 4),
        group_index=torch.arange(B) // 4,
        zero_var_groups=0,
    )


def loss_on(learner: Learner, batch: Batch, lam: float):
    cfg = learner.config
    out = learner.policy.token_logprobs(batch.prompt_ids, batch.completion_ids)
    adv = batch.advantages[:, None].expand_as(batch.behavior_logp)
    return learner.loss_fn(
        out.logp, batch.behavior_logp, adv, batch.mask, lam=lam, group_ids=batch.group_index,
        var_budget=cfg.dual.budget, **cfg.loss_options,
    )  # fmt: skip


def grads_of(policy: FakePolicy, loss: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, [policy.model.logits], retain_graph=True)
    return g


def _config(**kw) -> LearnerConfig:
    base = {"algo": "r2vpo", "loss_options": {"trust_region": "behavior"}, "grad_clip_penalty": None}
    return LearnerConfig(**(base | kw))


@pytest.mark.parametrize("lam", [0.5, 20.0])
def test_split_clip_clips_each_part_to_its_own_norm(lam):
    policy = FakePolicy()
    learner = Learner(policy, _config(grad_clip=0.3, grad_clip_penalty=0.1))
    batch = make_batch(policy)
    result = loss_on(learner, batch, lam)
    g_sur, g_pen = grads_of(policy, result.parts["surrogate"]), grads_of(policy, result.parts["penalty"])
    learner.optimizer.zero_grad()
    metrics = learner._backward(result, lam)
    n_sur, n_pen = float(g_sur.norm()), float(g_pen.norm())
    expected = g_sur * min(1, 0.3 / (n_sur + 1e-6)) + g_pen * min(1, 0.1 / (n_pen + 1e-6))
    torch.testing.assert_close(policy.model.logits.grad, expected)
    assert metrics["grad_norm_surrogate"] == pytest.approx(n_sur, rel=1e-5)
    assert metrics["grad_norm_penalty"] == pytest.approx(n_pen, rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(float((g_sur + g_pen).norm()), rel=1e-5)


def test_joint_clip_of_the_two_parts_equals_one_backward_pass():
    policy = FakePolicy()
    learner = Learner(policy, _config(grad_clip=0.2))
    batch = make_batch(policy)
    result = loss_on(learner, batch, 3.0)
    learner.optimizer.zero_grad()
    metrics = learner._backward(result, 3.0)
    split = policy.model.logits.grad.clone()
    learner.optimizer.zero_grad()
    result = loss_on(learner, batch, 3.0)
    result.loss.backward()
    total = float(torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 0.2))
    torch.testing.assert_close(split, policy.model.logits.grad)
    assert metrics["grad_norm"] == pytest.approx(total, rel=1e-5)


def test_lam_zero_reports_the_whole_norm_as_surrogate():
    policy = FakePolicy()
    learner = Learner(policy, _config())
    result = loss_on(learner, make_batch(policy), 0.0)
    metrics = learner._backward(result, 0.0)
    assert metrics["grad_norm_penalty"] == 0.0
    assert metrics["grad_norm_surrogate"] == metrics["grad_norm"] > 0


@pytest.mark.parametrize(("every", "expected_updates"), [("step", 3), ("batch", 1)])
def test_dual_cadence_per_step_or_per_batch(every, expected_updates):
    policy = FakePolicy()
    cfg = _config(updates_per_batch=3, dual={"lr": 0.5, "update_every": every})
    learner = Learner(policy, cfg)
    metrics = learner._update(make_batch(policy))
    assert learner.dual.num_updates == expected_updates
    assert metrics["lam_next"] == learner.dual.lam > 0
    assert {"grad_norm_surrogate", "grad_norm_penalty", "ratio_p999", "ess"} <= set(metrics)


def test_proximal_trust_region_sees_no_drift_on_the_first_update():
    policy = FakePolicy()
    learner = Learner(policy, _config(loss_options={"trust_region": "proximal"}, dual={"lam_init": 1.0}))
    metrics = learner._update(make_batch(policy))
    assert metrics["penalty_var"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["ratio_var"] > 0.04  # the stale behaviour ratio is still measured


def test_algo_defaults_fill_in_what_the_config_leaves_unset(monkeypatch):
    table = {
        "r2vpo": {
            "loss_options": {"penalty": "log_ratio", "sample_weight": "chi2"},
            "dual": {"ema": 0.5, "update_every": "batch"},
            "grad_clip_penalty": 0.25,
        }
    }
    monkeypatch.setattr(learner_mod, "ALGO_DEFAULTS", table)
    cfg = LearnerConfig(algo="r2vpo", loss_options={"sample_weight": "none"}, dual=DualConfig(budget=0.1))
    assert cfg.loss_options == {"penalty": "log_ratio", "sample_weight": "none"}  # explicit wins
    assert (cfg.dual.budget, cfg.dual.ema, cfg.dual.update_every) == (0.1, 0.5, "batch")
    assert cfg.grad_clip_penalty == 0.25
    assert LearnerConfig(algo="r2vpo", grad_clip_penalty=None).grad_clip_penalty is None
    assert LearnerConfig.model_validate_json(cfg.model_dump_json()) == cfg  # config.json reproduces the run
    grpo = LearnerConfig(algo="grpo")
    assert grpo.loss_options == {} and grpo.grad_clip_penalty is None and grpo.dual.ema == 0.0


def test_shipped_r2vpo_default_is_valid_and_runs():
    policy = FakePolicy()
    learner = Learner(policy, LearnerConfig(algo="r2vpo", updates_per_batch=2))
    metrics = learner._update(make_batch(policy))
    assert metrics["lam_next"] >= 0 and metrics["grad_norm"] > 0
