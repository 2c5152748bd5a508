"""Staleness rules, lag weights and the version-aware replay buffer."""

from __future__ import annotations

import random

import pytest
import torch

from client.schemas import Completion, TrajectoryGroup
from trainer.replay import ReplayBuffer, ReplayConfig
from trainer.staleness import (
    BASELINE_MAX_LAG,
    StalenessConfig,
    effective_max_lag,
    is_admissible,
    lag_of,
    lag_weights,
    staleness_histogram,
)


def _group(group_id: str, version: int) -> TrajectoryGroup:
    completion = Completion(
        token_ids=[5, 2], behavior_logprobs=[-0.1, -0.2], reward=1.0, policy_version=version
    )
    return TrajectoryGroup(group_id=group_id, prompt_token_ids=[1, 7], completions=[completion, completion])


def test_lag_is_versions_behind_the_learner_and_never_negative():
    assert lag_of(10, 7) == 3
    with pytest.raises(ValueError, match="newer than the learner"):
        lag_of(3, 4)


def test_baselines_drop_beyond_max_lag_while_r2vpo_keeps_stale_samples():
    default = StalenessConfig()
    assert effective_max_lag("grpo", default) == BASELINE_MAX_LAG
    assert effective_max_lag("r2vpo", default) is None
    assert not is_admissible(BASELINE_MAX_LAG + 1, effective_max_lag("grpo", default))
    assert is_admissible(1000, effective_max_lag("r2vpo", default))
    assert effective_max_lag("r2vpo", StalenessConfig(max_lag=2)) == 2


def test_lag_weights_decay_geometrically_and_are_one_without_decay():
    lags = torch.tensor([0, 1, 3])
    assert torch.allclose(lag_weights(lags, 0.5), torch.tensor([1.0, 0.5, 0.125]))
    assert torch.equal(lag_weights(lags, 1.0), torch.ones(3))


def test_staleness_histogram_counts_samples_per_lag_sorted():
    assert list(staleness_histogram([2, 0, 2, 1]).items()) == [(0, 1), (1, 1), (2, 2)]


def test_replay_keeps_recent_groups_and_evicts_old_ones():
    buffer = ReplayBuffer(ReplayConfig(capacity=3, max_age=2, groups_per_batch=2))
    buffer.add([_group("a", 0), _group("b", 1), _group("c", 2), _group("d", 3)])
    assert len(buffer) == 3  # capacity: the oldest ("a") left first
    assert buffer.evict_older_than(4) == 1  # "b" is 3 versions old > max_age 2
    picked = buffer.sample(random.Random(0), exclude={"c"})
    assert [g.group_id for g in picked] == ["d"]


def test_replay_disabled_by_default_stores_nothing():
    buffer = ReplayBuffer(ReplayConfig())
    buffer.add([_group("a", 0)])
    assert len(buffer) == 0 and buffer.sample(random.Random(0)) == []
