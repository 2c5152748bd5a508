"""R²VPO study options of trainer.losses: closed-form gradients in float64 (as for the base loss)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_losses import ascent, batches, lams, make_batch, ratio_and_adv

from trainer.losses import LOSSES, r2vpo_loss


def _n(mask):
    return mask.sum()


@settings(max_examples=40, deadline=None)
@given(batch=batches, lam=lams, center=st.sampled_from(["mean", "one"]))
def test_log_ratio_penalty_gradient_matches_closed_form(batch, lam, center):
    logp, behavior, adv, mask = batch
    out = r2vpo_loss(logp, behavior, adv, mask, lam, penalty="log_ratio", center=center)
    ratio, adv = ratio_and_adv(logp, behavior, adv, mask)
    log_r = torch.where(mask, logp.detach() - behavior, 0.0)
    bar = log_r[mask].mean() if center == "mean" else 0.0
    expected = torch.where(mask, ratio * adv - 2 * lam * (log_r - bar), 0.0) / _n(mask)
    torch.testing.assert_close(ascent(out.loss, logp), expected)
    torch.testing.assert_close(out.ratio_var, ((log_r - bar)[mask] ** 2).mean())


@settings(max_examples=40, deadline=None)
@given(batch=batches, lam=lams, clip=st.floats(0.5, 3.0))
def test_truncated_penalty_gradient_matches_closed_form(batch, lam, clip):
    logp, behavior, adv, mask = batch
    out = r2vpo_loss(logp, behavior, adv, mask, lam, penalty="truncated", penalty_clip=clip)
    ratio, adv = ratio_and_adv(logp, behavior, adv, mask)
    t = ratio.clamp(max=clip)
    t_bar = t[mask].mean()
    expected = ratio * adv - 2 * lam * (t - t_bar) * ratio * (ratio < clip)
    expected = torch.where(mask, expected, 0.0) / _n(mask)
    torch.testing.assert_close(ascent(out.loss, logp), expected)


@settings(max_examples=40, deadline=None)
@given(batch=batches, lam=lams, budget=st.floats(0.005, 0.5))
def test_chi2_sample_weight_matches_per_row_reference(batch, lam, budget):
    logp, behavior, adv, mask = batch
    out = r2vpo_loss(logp, behavior, adv, mask, lam, sample_weight="chi2", var_budget=budget)
    ratio, adv = ratio_and_adv(logp, behavior, adv, mask)
    w = torch.ones(len(mask), 1, dtype=torch.float64)
    for i in range(len(mask)):
        if mask[i].any():
            chi2 = ((ratio[i][mask[i]] - 1) ** 2).mean()
            w[i] = min(1.0, budget / float(chi2)) if chi2 > 0 else 1.0
            assert float(w[i]) * float(chi2) <= budget * (1 + 1e-9)  # each sample meets the budget
    r_bar = ratio[mask].mean()
    expected = torch.where(mask, w * ratio * adv - 2 * lam * (ratio - r_bar) * ratio, 0.0) / _n(mask)
    torch.testing.assert_close(ascent(out.loss, logp), expected)
    assert 0 < out.metrics["sample_weight_min"] <= out.metrics["sample_weight_mean"] <= 1


@settings(max_examples=40, deadline=None)
@given(batch=batches, lam=lams, seed=st.integers(0, 1000), level=st.sampled_from(["token", "group"]))
def test_proximal_trust_region_penalises_the_ratio_to_the_batch_start(batch, lam, seed, level):
    logp, behavior, adv, mask = batch
    g = torch.Generator().manual_seed(seed)
    proximal = torch.where(
        mask, logp.detach() + 0.2 * torch.randn(mask.shape, generator=g, dtype=logp.dtype), 0
    )
    group_ids = torch.arange(len(mask)) % 2
    out = r2vpo_loss(
        logp,
        behavior,
        adv,
        mask,
        lam,
        trust_region="proximal",
        proximal_logp=proximal,
        var_level=level,
        group_ids=group_ids,
    )
    ratio, adv = ratio_and_adv(logp, behavior, adv, mask)
    q = torch.exp(torch.where(mask, logp.detach() - proximal, 0.0))
    q_bar = torch.zeros_like(q)
    if level == "token":
        q_bar[:] = q[mask].mean()
    else:
        for k in (0, 1):
            rows = (group_ids == k).unsqueeze(1) & mask
            q_bar[group_ids == k] = q[rows].mean() if rows.any() else 0.0
    expected = torch.where(mask, ratio * adv - 2 * lam * (q - q_bar) * q, 0.0) / _n(mask)
    torch.testing.assert_close(ascent(out.loss, logp), expected)
    torch.testing.assert_close(out.ratio_var, ((q - q_bar)[mask] ** 2).mean())


@settings(max_examples=40, deadline=None)
@given(batch=batches, lam=lams, seed=st.integers(0, 1000), cap=st.sampled_from([1.0, 1.5, 4.0]))
def test_stale_weight_cap_truncates_only_the_stale_factor_of_the_importance_weight(batch, lam, seed, cap):
    logp, behavior, adv, mask = batch
    g = torch.Generator().manual_seed(seed)
    proximal = torch.where(
        mask, logp.detach() + 0.5 * torch.randn(mask.shape, generator=g, dtype=logp.dtype), 0
    )
    out = r2vpo_loss(
        logp, behavior, adv, mask, lam, trust_region="proximal", proximal_logp=proximal, stale_weight_cap=cap
    )
    _, adv = ratio_and_adv(logp, behavior, adv, mask)
    q = torch.exp(torch.where(mask, logp.detach() - proximal, 0.0))
    stale = torch.exp(torch.where(mask, proximal - behavior, 0.0)).clamp(max=cap)
    q_bar = q[mask].mean()
    # −∂loss/∂logp_j = (1/N)·(q_j·c_j·A_j − 2·lam·(q_j − q̄)·q_j), c_j = min(π_prox/π_b, cap) held constant
    expected = torch.where(mask, q * stale * adv - 2 * lam * (q - q_bar) * q, 0.0) / _n(mask)
    torch.testing.assert_close(ascent(out.loss, logp), expected)
    assert out.metrics["surrogate"] == pytest.approx((q * stale * adv)[mask].mean().item(), rel=1e-9)


def test_stale_weight_cap_needs_the_proximal_trust_region_and_a_cap_of_at_least_one():
    logp, behavior, adv, mask = make_batch(2, 3, 4)
    with pytest.raises(ValueError, match="stale_weight_cap needs trust_region='proximal'"):
        r2vpo_loss(logp, behavior, adv, mask, 0.1, stale_weight_cap=2.0)
    with pytest.raises(ValueError, match="cap >= 1"):
        r2vpo_loss(
            logp,
            behavior,
            adv,
            mask,
            0.1,
            trust_region="proximal",
            proximal_logp=logp.detach(),
            stale_weight_cap=0.5,
        )


def test_proximal_equal_to_current_weights_has_no_penalty_gradient():
    logp, behavior, adv, mask = make_batch(3, 4, 6, spread=0.5)
    out = r2vpo_loss(logp, behavior, adv, mask, 3.0, trust_region="proximal", proximal_logp=logp.detach())
    plain = r2vpo_loss(logp, behavior, adv, mask, 0.0)
    assert out.metrics["penalty_var"] == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(ascent(out.loss, logp), ascent(plain.loss, logp))


@settings(max_examples=30, deadline=None)
@given(batch=batches, lam=lams, normalize=st.booleans(), penalty=st.sampled_from(["ratio", "log_ratio"]))
def test_parts_sum_to_the_loss_and_split_its_gradient(batch, lam, normalize, penalty):
    logp, behavior, adv, mask = batch
    out = r2vpo_loss(logp, behavior, adv, mask, lam, normalize_by_lambda=normalize, penalty=penalty)
    assert out.parts is not None
    torch.testing.assert_close(out.parts["surrogate"] + out.parts["penalty"], out.loss)
    ratio, adv_t = ratio_and_adv(logp, behavior, adv, mask)
    (g_sur,) = torch.autograd.grad(out.parts["surrogate"], logp, retain_graph=True)
    scale = 1 / (1 + lam) if normalize else 1.0
    torch.testing.assert_close(-g_sur, torch.where(mask, ratio * adv_t, 0.0) / _n(mask) * scale)


def test_tail_quantile_metric_is_reported_by_every_loss():
    logp, behavior, adv, mask = make_batch(0, 4, 6)
    for name, fn in LOSSES.items():
        m = fn(logp, behavior, adv, mask, lam=0.5, proximal_logp=logp.detach()).metrics
        assert m["ratio_p99"] <= m["ratio_p999"] <= m["ratio_max"] + 1e-12, name


def test_baselines_and_behaviour_trust_region_ignore_proximal_logp():
    logp, behavior, adv, mask = make_batch(1, 3, 5)
    junk = torch.full_like(logp, float("nan"))
    for name, fn in LOSSES.items():
        a = fn(logp, behavior, adv, mask, lam=0.3, proximal_logp=junk)
        b = fn(logp, behavior, adv, mask, lam=0.3)
        torch.testing.assert_close(a.loss, b.loss, equal_nan=False, msg=name)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"penalty": "cubic"}, "unknown penalty"),
        ({"sample_weight": "chi2"}, "needs var_budget"),
        ({"sample_weight": "ess"}, "unknown sample_weight"),
        ({"trust_region": "proximal"}, "needs proximal_logp"),
        ({"trust_region": "anchor"}, "unknown trust_region"),
        ({"penalty": "truncated", "penalty_clip": 0.0}, "penalty_clip"),
    ],
)
def test_invalid_study_options_are_rejected(options, match):
    logp, behavior, adv, mask = make_batch(0, 2, 3)
    with pytest.raises(ValueError, match=match):
        r2vpo_loss(logp, behavior, adv, mask, 0.1, **options)
