"""trainer.learner / trainer.sync guards: a non-finite update is never applied (and the run goes on), and the
learner's `device` setting (spelling, existence, CPU checkpoints).

The non-finite updates are real, on the embedded tiny policy: a group whose rewards are finite floats but
overflow float32 (NaN advantages), a model whose last MLP is rescaled so that its output is the same but its
gradient norm overflows, and a learning rate so large that the first update makes the next forward pass NaN.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from pydantic import ValidationError

from client.schemas import TrajectoryGroup
from trainer.checkpoint import load_trainer_state, save_checkpoint
from trainer.device import DeviceUnavailable, resolve_device, to_cpu
from trainer.learner import Learner, LearnerConfig
from trainer.policy import Policy
from trainer.rollout import generate_groups
from trainer.sync import SyncTrainConfig, run_sync
from trainer.task import Task, TaskConfig

HUGE = 3e38  # a finite float (and float32); three of them overflow a float32 sum
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def sample_groups(policy: Policy, n: int, seed: int = 0) -> list[TrajectoryGroup]:
    task = Task(TaskConfig(heldout_size=0))
    problems = task.sample_train(n, random.Random(seed))
    g = torch.Generator().manual_seed(seed)
    return generate_groups(policy, task, problems, group_size=4, max_new_tokens=8, temperature=1.0, version=0,
                           generator=g)  # fmt: skip


def poisoned(group: TrajectoryGroup, rewards: tuple[float, ...] = (HUGE, HUGE, HUGE, 0.0)) -> TrajectoryGroup:
    """The group with these rewards, valid on the wire (finite floats); the default: NaN advantages."""
    data = json.loads(group.model_dump_json())
    for completion, reward in zip(data["completions"], rewards, strict=True):
        completion["reward"] = reward
    return TrajectoryGroup.model_validate(data)


def overflowing(policy: Policy, scale: float = 1e25) -> Policy:
    """Scale the last MLP's up-projection by `scale` and its down-projection by 1/scale: the same function
    (log-probs equal to 1e-6), but the down-projection's gradient is ~scale times larger: its norm is inf."""
    mlp = policy.model.model.layers[-1].mlp
    with torch.no_grad():
        mlp.up_proj.weight.mul_(scale)
        mlp.down_proj.weight.div_(scale)
    return policy


def snapshot(learner: Learner) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in learner.policy.model.state_dict().items()},
        "optimizer": copy.deepcopy(learner.optimizer.state_dict()),
        "state": learner.state(),
        "replay": len(learner.replay),
    }


def assert_unchanged(learner: Learner, before: dict) -> None:
    after = snapshot(learner)
    assert after["state"] == before["state"] and after["replay"] == before["replay"]
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), name
    for idx, state in before["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(after["optimizer"]["state"][idx][key], value), (idx, key)


@pytest.fixture
def policy(default_policy_dir) -> Policy:
    return Policy.from_pretrained(default_policy_dir)


def test_poisoned_batch_is_not_applied_and_the_next_batch_trains(policy):
    learner = Learner(policy, LearnerConfig(replay={"capacity": 64, "groups_per_batch": 1}))
    groups = sample_groups(policy, 12)
    assert learner.train_on(groups[:4]).trained  # a real step first: optimizer state, λ and replay exist
    before = snapshot(learner)
    batch = [poisoned(groups[4]), *groups[5:8]]

    result = learner.train_on(batch)

    assert result.trained == [] and result.skipped == [g.group_id for g in batch]
    assert result.skip_reason.startswith("non-finite advantages") and "version 1" in result.skip_reason
    assert result.metrics["nonfinite_updates"] == 1 and result.metrics["updates_applied"] == 0
    assert_unchanged(learner, before)  # weights, Adam moments, λ, version, step, replay buffer
    result = learner.train_on(groups[8:])
    assert result.trained == [g.group_id for g in groups[8:]] and not result.skipped
    assert learner.version == 2 and result.metrics["nonfinite_updates"] == 0


def test_reward_beyond_float32_skips_the_batch_instead_of_raising(policy):
    learner = Learner(policy, LearnerConfig())
    groups = sample_groups(policy, 4)
    before = snapshot(learner)
    result = learner.train_on([poisoned(groups[0], (1e39, 0.0, 0.0, 0.0)), *groups[1:]])
    assert result.skipped == [g.group_id for g in groups] and not result.trained
    assert result.skip_reason.startswith("non-finite batch: rewards contain NaN or inf")
    assert_unchanged(learner, before)


def test_overflowing_gradient_norm_skips_the_update(policy):
    learner = Learner(overflowing(policy), LearnerConfig())
    before = snapshot(learner)
    groups = [g for g in sample_groups(policy, 8) if len(set(g.rewards)) > 1]  # a learning signal
    assert groups
    result = learner.train_on(groups)
    assert result.skipped == [g.group_id for g in groups]
    assert result.skip_reason.startswith("non-finite gradient norm")
    assert_unchanged(learner, before)


def test_nonfinite_later_update_keeps_the_applied_one(policy):
    # lr 1e10: the first update is finite, but its weights overflow the next forward pass (NaN log-probs).
    learner = Learner(policy, LearnerConfig(lr=1e10, updates_per_batch=2))
    groups = sample_groups(policy, 8)
    result = learner.train_on(groups)
    assert result.trained == [g.group_id for g in groups] and not result.skipped
    assert result.metrics["updates_applied"] == 1 and result.metrics["nonfinite_updates"] == 1
    reason = result.metrics["nonfinite_reason"]
    assert reason.startswith("non-finite log-probs of the policy") and "update 2/2" in reason
    assert learner.version == learner.step == 1
    assert all(bool(torch.isfinite(p).all()) for p in policy.model.parameters())


def test_sync_trainer_skips_nonfinite_batches_and_finishes_the_run(tmp_path, policy, caplog):
    model_dir = tmp_path / "overflowing"
    overflowing(policy).save(model_dir)
    cfg = SyncTrainConfig(run_dir=tmp_path / "run", model=model_dir, steps=3, prompts_per_batch=4,
                          group_size=4, eval_every=100, task={"heldout_size": 10})  # fmt: skip
    with caplog.at_level("WARNING", logger="r2vpo.sync"):
        summary = run_sync(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["skipped_batches"] >= 1 and summary["steps"] == 3
    assert summary["optimizer_steps"] == len(rows) == 3 - summary["skipped_batches"]
    assert summary["skipped_groups"] == 4 * summary["skipped_batches"]
    assert summary["device"] == "cpu" and summary["final_accuracy"] is not None
    assert sum("not applied" in r.message for r in caplog.records) == summary["skipped_batches"]
    written = json.loads((cfg.run_dir / "summary.json").read_text())
    assert written["skipped_batches"] == summary["skipped_batches"]


# --- device ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "mps", "cpu0", ""])
def test_device_spelling_is_checked_with_the_choices_named(spec):
    with pytest.raises(ValidationError, match=r"'cpu', 'cuda', 'cuda:N' or 'auto'"):
        LearnerConfig(device=spec)


def test_device_accepts_cpu_cuda_cuda_n_and_auto():
    assert [LearnerConfig(device=d).device for d in ("cpu", "CUDA", "cuda:1", " auto")] == [
        "cpu", "cuda", "cuda:1", "auto",
    ]  # fmt: skip
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)


@NO_CUDA
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_unavailable_cuda_is_refused_before_anything_is_built(spec, policy):
    message = rf"learner.device is '{spec}' but .*; set it to 'cpu' or 'auto'"
    with pytest.raises(DeviceUnavailable, match=message):
        resolve_device(spec)
    with pytest.raises(DeviceUnavailable):
        Learner(policy, LearnerConfig(device=spec))


def test_checkpoints_hold_cpu_tensors_and_tied_weights_stay_tied(tmp_path, policy):
    learner = Learner(policy, LearnerConfig(device="auto"))
    learner.train_on(sample_groups(policy, 4))
    state = to_cpu(policy.model.state_dict())
    assert all(t.device.type == "cpu" for t in state.values())
    embed, head = state["model.embed_tokens.weight"], state["lm_head.weight"]  # tied in the tiny model
    assert embed is head
    path = save_checkpoint(tmp_path, policy=policy, optimizer=learner.optimizer, state=learner.state(),
                           rng=random.Random(0))  # fmt: skip
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    assert all(t.device.type == "cpu" for s in saved["state"].values() for t in s.values())
    reloaded = Policy.from_pretrained(path / "model")
    for name, value in reloaded.model.state_dict().items():
        assert torch.equal(value, state[name].cpu()), name
    fresh = Learner(reloaded, LearnerConfig())
    load_trainer_state(path, fresh.optimizer, random.Random(0))
    assert fresh.optimizer.state_dict()["state"].keys() == saved["state"].keys()
