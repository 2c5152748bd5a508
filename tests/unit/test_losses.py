"""trainer.losses: closed-form gradients in float64, clipping semantics, masking and validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.losses import (
    LOSSES,
    cispo_loss,
    dapo_loss,
    get_loss,
    gspo_loss,
    is_loss,
    masked_mean,
    ppo_clip_loss,
    r2vpo_loss,
)

GARBAGE = torch.tensor([math.nan, math.inf, -math.inf, 1e30], dtype=torch.float64)


def make_batch(seed: int, B: int, T: int, spread: float = 0.3, adv_1d: bool = False):
    """Random float64 batch; masked positions of every input hold NaN / ±inf / huge values."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[torch.randint(B, (), generator=g), torch.randint(T, (), generator=g)] = True
    logp = -2 * torch.rand(B, T, generator=g, dtype=torch.float64)
    behavior = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B if adv_1d else (B, T), generator=g, dtype=torch.float64)
    junk = GARBAGE[torch.randint(len(GARBAGE), (B, T), generator=g)]
    logp, behavior = torch.where(mask, logp, junk), torch.where(mask, behavior, junk.flip(0))
    if not adv_1d:
        adv = torch.where(mask, adv, junk)
    return logp.requires_grad_(), behavior, adv, mask


batches = st.builds(
    make_batch,
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 4),
    T=st.integers(1, 6),
    adv_1d=st.booleans(),
)
lams = st.floats(0.0, 5.0)


def ratio_and_adv(logp, behavior, adv, mask):
    ratio = torch.exp(torch.where(mask, logp.detach() - behavior, 0.0))
    adv = adv.unsqueeze(-1).expand_as(mask) if adv.dim() == 1 else adv
    return ratio, torch.where(mask, adv, 0.0)


def ascent(loss: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(grad).all()
    return -grad


@settings(max_examples=50, deadline=None)
@given(batch=batches, lam=lams, normalize=st.booleans(), center=st.sampled_from(["mean", "one"]))
def test_r2vpo_token_gradient_matches_closed_form(batch, lam, normalize, center):
    logp, behavior, adv, mask = batch
    out = r2vpo_loss(logp, behavior, adv, mask, lam, normalize_by_lambda=normalize, center=center)
    ratio, adv = ratio_and_adv(logp, behavior, adv, mask)
    ratio_bar = ratio[mask].mean() if center == "mean" else 1.0
    expected = torch.where(mask, ratio * (adv - 2 * lam * (ratio - ratio_bar)), 0.0) / mask.sum()
    if normalize:
        expected = expected / (1 + lam)
    torch.testing.assert_close(ascent(out.loss, logp), expected)


@settings(max_examples=50, deadline=None)
@given(batch=batches, lam=lams, data=st.data())
def test_r2vpo_group_variance_is_centred_per_group(batch, lam, data):
    logp, behavior, adv, mask = batch
    group_ids = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=len(mask), max_size=len(mask))))
    out = r2vpo_loss(logp, behavior, adv, mask, lam, var_level="group", group_ids=group_ids)
    ratio, adv = ratio_and_adv(logp, behavior, adv, mask)
    ratio_bar = torch.zeros_like(ratio)
    for g in group_ids.unique():
        rows = (group_ids == g).unsqueeze(1) & mask
        ratio_bar[group_ids == g] = ratio[rows].mean() if rows.any() else 0.0
    V = ((ratio - ratio_bar)[mask] ** 2).mean()
    torch.testing.assert_close(out.ratio_var, V)
    assert out.metrics["ratio_var"] == pytest.approx(float(V))
    expected = torch.where(mask, ratio * (adv - 2 * lam * (ratio - ratio_bar)), 0.0) / mask.sum()
    torch.testing.assert_close(ascent(out.loss, logp), expected)


def sequence_reference(logp, behavior, adv, mask, lam):
    """R²VPO with the sequence ratio, written as an explicit loop over the valid tokens of each row."""
    seq_ratios, seq_advs = [], []
    for i in range(len(mask)):
        idx = mask[i].nonzero().squeeze(1)
        if len(idx):
            seq_ratios.append(torch.exp((logp[i, idx] - behavior[i, idx]).mean()))
            seq_advs.append(adv[i] if adv.dim() == 1 else adv[i, idx].mean())
    s, a = torch.stack(seq_ratios), torch.stack(seq_advs)
    return -(s * a).mean() + lam * ((s - s.mean()) ** 2).mean()


@settings(max_examples=50, deadline=None)
@given(batch=batches, lam=lams)
def test_r2vpo_sequence_level_matches_loop_reference(batch, lam):
    logp, behavior, adv, mask = batch
    out = r2vpo_loss(logp, behavior, adv, mask, lam, var_level="sequence")
    ref = sequence_reference(logp, behavior, adv, mask, lam)
    torch.testing.assert_close(out.loss, ref)
    (ref_grad,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(ascent(out.loss, logp), -ref_grad)


@settings(max_examples=50, deadline=None)
@given(batch=batches)
def test_lam_zero_equals_unclipped_importance_sampling(batch):
    logp, behavior, adv, mask = batch
    ratio, adv_tok = ratio_and_adv(logp, behavior, adv, mask)
    expected = -(ratio * adv_tok)[mask].mean()
    torch.testing.assert_close(r2vpo_loss(logp, behavior, adv, mask, 0.0).loss, expected)
    torch.testing.assert_close(is_loss(logp, behavior, adv, mask).loss, expected)


def test_on_policy_ratio_is_one_with_zero_variance_and_full_ess():
    logp, _, adv, mask = make_batch(0, 3, 5)
    m = r2vpo_loss(logp, logp.detach().clone(), adv, mask, 1.0).metrics
    assert (m["ratio_mean"], m["ratio_var"], m["ess"]) == (1.0, 0.0, 1.0)
    assert m["kl_k1"] == m["kl_k3"] == m["would_clip_frac"] == m["sign_flip_frac"] == 0.0


def test_sign_flip_and_would_clip_fractions_on_a_handmade_batch():
    # ratios [2, 1], r̄ = 1.5, A = 1, lam = 2: coefficients 2(1 − 4·0.5) < 0 (flip) and 1(1 + 4·0.5) > 0
    logp = torch.tensor([[math.log(2.0), 0.0]], dtype=torch.float64, requires_grad=True)
    behavior, adv, mask = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1), torch.ones(1, 2, dtype=bool)
    out = r2vpo_loss(logp, behavior, adv, mask, 2.0)
    assert out.metrics["sign_flip_frac"] == 0.5 and out.metrics["would_clip_frac"] == 0.5
    assert out.metrics["ratio_max"] == 2.0 and out.metrics["ratio_min"] == 1.0
    assert out.metrics["ratio_p99"] == pytest.approx(1.99)
    assert out.metrics["ess"] == pytest.approx(9 / 10) and out.metrics["lam"] == 2.0
    assert out.metrics["loss"] == pytest.approx(-1.5 + 2 * 0.25)


@settings(max_examples=50, deadline=None)
@given(batch=batches, eps_high=st.sampled_from([0.2, 0.28]))
def test_ppo_clip_zeroes_exactly_the_clipped_tokens_gradient(batch, eps_high):
    logp, behavior, adv, mask = batch
    out = ppo_clip_loss(logp, behavior, adv, mask, eps_high=eps_high)
    ratio, adv = ratio_and_adv(logp, behavior, adv, mask)
    clipped = ((ratio > 1 + eps_high) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    expected = torch.where(mask & ~clipped, ratio * adv, 0.0) / mask.sum()
    torch.testing.assert_close(ascent(out.loss, logp), expected)
    assert out.metrics["clip_frac"] == pytest.approx(float(clipped[mask].double().mean()))


def test_dapo_clips_higher_than_ppo():
    logp = torch.tensor([[math.log(1.25)]], requires_grad=True)
    args = (torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1, dtype=bool))
    assert ppo_clip_loss(logp, *args).metrics["clip_frac"] == 1.0
    assert dapo_loss(logp, *args).metrics["clip_frac"] == 0.0


@settings(max_examples=50, deadline=None)
@given(batch=batches)
def test_gspo_sequence_ratio_is_exp_of_mean_log_ratio(batch):
    logp, behavior, adv, mask = batch
    out = gspo_loss(logp, behavior, adv, mask, eps=1.0, eps_high=1e9)  # clip bounds that never bind
    torch.testing.assert_close(out.loss, sequence_reference(logp, behavior, adv, mask, 0.0))
    rows = [i for i in range(len(mask)) if mask[i].any()]
    seq_ratio = [math.exp(float((logp[i].detach() - behavior[i])[mask[i]].mean())) for i in rows]
    assert out.metrics["ratio_mean"] == pytest.approx(sum(seq_ratio) / len(rows))
    assert out.metrics["ratio_max"] == pytest.approx(max(seq_ratio))


def test_gspo_clips_sequences_outside_the_trust_band():
    logp = torch.tensor([[0.01, 0.01], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out = gspo_loss(logp, torch.zeros(2, 2, dtype=torch.float64), torch.ones(2), torch.ones(2, 2, dtype=bool))
    assert out.metrics["clip_frac"] == 0.5
    torch.testing.assert_close(ascent(out.loss, logp)[0], torch.zeros(2, dtype=torch.float64))


@settings(max_examples=50, deadline=None)
@given(batch=batches)
def test_cispo_gradient_is_stop_gradient_clipped_weight_times_advantage(batch):
    logp, behavior, adv, mask = batch
    out = cispo_loss(logp, behavior, adv, mask, eps_low=0.2, eps_high=0.28)
    ratio, adv = ratio_and_adv(logp, behavior, adv, mask)
    expected = torch.where(mask, ratio.clamp(0.8, 1.28) * adv, 0.0) / mask.sum()
    torch.testing.assert_close(ascent(out.loss, logp), expected)


def test_cispo_keeps_a_gradient_on_clipped_tokens():
    logp = torch.tensor([[math.log(3.0)]], requires_grad=True)
    out = cispo_loss(logp, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1, dtype=bool))
    assert out.metrics["clip_frac"] == 1.0
    assert ascent(out.loss, logp).item() == pytest.approx(1.28)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_masked_garbage_gives_finite_loss_and_zero_gradient(name):
    logp, behavior, adv, mask = make_batch(1, 4, 6)
    assert not torch.isfinite(logp[~mask]).all()
    out = get_loss(name)(logp, behavior, adv, mask, lam=1.0, group_ids=torch.arange(4) % 2)
    assert torch.isfinite(out.loss) and all(math.isfinite(v) for v in out.metrics.values())
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_huge_log_ratio_is_clamped_to_a_finite_loss(name):
    logp = torch.tensor([[1000.0, 0.0]], requires_grad=True)
    out = get_loss(name)(logp, torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2, dtype=bool), lam=1.0)
    assert torch.isfinite(out.loss) and math.isfinite(out.metrics["ratio_max"])
    assert torch.isfinite(torch.autograd.grad(out.loss, logp)[0]).all()


def _bad(**overrides):
    args = {"logp": torch.zeros(2, 3), "behavior_logp": torch.zeros(2, 3), "advantages": torch.ones(2)}
    args["mask"] = torch.ones(2, 3, dtype=bool)
    return {**args, **overrides}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (_bad(behavior_logp=torch.zeros(2, 4)), r"shape mismatch: behavior_logp has shape \[2, 4\]"),
        (_bad(mask=torch.ones(3, 3, dtype=bool)), r"shape mismatch: mask has shape \[3, 3\]"),
        (_bad(advantages=torch.ones(3)), r"shape mismatch: advantages has shape \[3\]"),
        (_bad(logp=torch.zeros(6)), "logp must be a 2-D float tensor"),
        (_bad(mask=torch.ones(2, 3)), "mask must be a bool tensor"),
        (_bad(mask=torch.zeros(2, 3, dtype=bool)), "empty mask"),
        (_bad(logp=torch.tensor([[0.0, math.nan, 0.0]] * 2)), "logp has NaN or inf at a valid"),
        (_bad(behavior_logp=torch.tensor([[0.0, 0.0, -math.inf]] * 2)), "behavior_logp has NaN or inf"),
        (_bad(advantages=torch.tensor([1.0, math.nan])), "advantages has NaN or inf"),
    ],
)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bad_inputs_raise_a_value_error_naming_the_problem(name, args, match):
    with pytest.raises(ValueError, match=match):
        get_loss(name)(**args)


def test_r2vpo_option_errors():
    args = _bad()
    with pytest.raises(ValueError, match="var_level='group' needs group_ids"):
        r2vpo_loss(**args, var_level="group")
    with pytest.raises(ValueError, match="unknown var_level 'tokens'; choose one of: token, sequence, group"):
        r2vpo_loss(**args, var_level="tokens")
    with pytest.raises(ValueError, match="unknown center"):
        r2vpo_loss(**args, center="median")
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        r2vpo_loss(**args, lam=-0.1)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_takes_the_common_signature(name):
    logp, behavior, adv, mask = make_batch(2, 3, 4)
    fn = get_loss(name)
    out = fn(logp, behavior, adv, mask, lam=0.5, group_ids=torch.tensor([0, 0, 1]), var_budget=0.04)
    assert out.loss.dim() == 0 and out.loss.requires_grad and torch.isfinite(out.loss)
    assert out.ratio_var is not None and not out.ratio_var.requires_grad
    assert out.metrics["var_minus_budget"] == pytest.approx(out.metrics["ratio_var"] - 0.04)
    assert 0 < out.metrics["ess"] <= 1 + 1e-9
    assert {"loss", "ratio_mean", "ratio_p99", "kl_k1", "kl_k3"} <= out.metrics.keys()
    assert "var_minus_budget" not in fn(logp, behavior, adv, mask).metrics


def test_registry_passes_options_and_lam_only_where_they_apply():
    logp, behavior, adv, mask = make_batch(3, 3, 4)
    assert LOSSES["r2vpo"](logp, behavior, adv, mask, lam=2.0).metrics["lam"] == 2.0
    grpo = LOSSES["grpo"](logp, behavior, adv, mask, lam=2.0).loss
    torch.testing.assert_close(grpo, ppo_clip_loss(logp, behavior, adv, mask).loss)
    wide = LOSSES["ppo"](logp, behavior, adv, mask, eps_low=1.0, eps_high=1e9).loss
    torch.testing.assert_close(wide, is_loss(logp, behavior, adv, mask).loss)


def test_unknown_algorithm_lists_the_choices():
    with pytest.raises(ValueError, match="unknown algorithm 'trpo'; choose one of: r2vpo, grpo, ppo"):
        get_loss("trpo")


def test_masked_mean_ignores_masked_nan():
    x = torch.tensor([[1.0, math.nan], [3.0, math.inf]])
    mask = torch.tensor([[True, False], [True, False]])
    assert masked_mean(x, mask).item() == 2.0
    assert masked_mean(x, mask, dim=1).tolist() == [1.0, 3.0]
