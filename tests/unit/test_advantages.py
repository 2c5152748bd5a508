"""trainer.advantages: group-normalised advantages (GRPO, Dr. GRPO)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.advantages import group_advantages

groups = st.integers(1, 5).flatmap(
    lambda size: st.lists(
        st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.5]), min_size=size, max_size=size),
        min_size=1,
        max_size=6,
    )
)


@settings(max_examples=50, deadline=None)
@given(rewards=groups)
def test_grpo_advantages_have_mean_zero_and_unit_std_per_informative_group(rewards):
    out = group_advantages(torch.tensor(rewards, dtype=torch.float64), kind="grpo", eps=0.0)
    adv = out.advantages[~out.zero_var_groups]
    if len(adv) == 0:
        return
    torch.testing.assert_close(adv.mean(dim=1), torch.zeros(len(adv), dtype=torch.float64))
    torch.testing.assert_close(adv.std(dim=1, unbiased=False), torch.ones(len(adv), dtype=torch.float64))


@settings(max_examples=50, deadline=None)
@given(rewards=groups)
def test_drgrpo_advantages_are_centred_only(rewards):
    r = torch.tensor(rewards, dtype=torch.float64)
    out = group_advantages(r, kind="drgrpo")
    torch.testing.assert_close(out.advantages, r - r.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("kind", ["grpo", "drgrpo"])
def test_zero_variance_groups_are_flagged_with_zero_advantage(kind):
    out = group_advantages([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.3 + 1e-9]], kind=kind)
    assert out.zero_var_groups.tolist() == [True, False, True]
    assert (out.advantages[[0, 2]] == 0).all() and (out.advantages[1] != 0).all()


def test_grpo_matches_hand_computation():
    out = group_advantages([[0.0, 1.0]], eps=0.0)
    assert out.advantages.tolist() == [[-1.0, 1.0]]
    assert out.advantages.dtype == torch.float32


def test_single_completion_groups_are_zero_variance():
    out = group_advantages(torch.tensor([[1.0], [0.0]]))
    assert out.zero_var_groups.all() and (out.advantages == 0).all()


def test_integer_rewards_are_promoted_to_float():
    assert group_advantages(torch.tensor([[0, 1]])).advantages.is_floating_point()


@pytest.mark.parametrize(
    ("rewards", "match"),
    [
        ([[1.0, 0.0], [1.0]], "ragged groups"),
        (torch.ones(4), "2-D"),
        (torch.ones(0, 3), "non-empty"),
        ([[float("nan"), 1.0]], "NaN or inf"),
    ],
)
def test_bad_rewards_raise(rewards, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards)


def test_unknown_kind_lists_the_choices():
    with pytest.raises(ValueError, match="unknown advantage kind 'ppo'; choose one of: grpo, drgrpo"):
        group_advantages([[1.0, 0.0]], kind="ppo")
