"""Checkpoints restore model, optimizer, dual state, counters and RNG; loading never unpickles objects."""

from __future__ import annotations

import random

import torch

from trainer.checkpoint import latest_checkpoint, load_trainer_state, prune_checkpoints, save_checkpoint
from trainer.learner import Learner, LearnerConfig
from trainer.policy import Policy
from trainer.tiny import build_tiny_model


def _learner() -> Learner:
    model, tokenizer = build_tiny_model()
    return Learner(Policy(model, tokenizer), LearnerConfig(algo="r2vpo", lr=1e-3))


def _step(learner: Learner) -> None:
    logp = learner.policy.token_logprobs([[1, 20, 30]], [[40, 2]]).logp
    logp.sum().backward()
    learner.optimizer.step()
    learner.dual.update(0.5)
    learner.version += 1
    learner.step += 1


def test_checkpoint_round_trip_restores_everything(tmp_path):
    learner = _learner()
    _step(learner)
    rng = random.Random(7)
    rng.random()
    torch.manual_seed(3)
    saved = save_checkpoint(tmp_path, policy=learner.policy, optimizer=learner.optimizer,
                            state=learner.state() | {"counters": {"rollouts": 128}}, rng=rng)  # fmt: skip
    expected_python, expected_torch = rng.random(), torch.rand(3)

    path = latest_checkpoint(tmp_path)
    assert path == saved
    restored = Learner(Policy.from_pretrained(path / "model"), LearnerConfig(algo="r2vpo", lr=1e-3))
    rng2 = random.Random(0)
    state = load_trainer_state(path, restored.optimizer, rng2)
    restored.load_state(state)
    assert (restored.version, restored.step, restored.dual.lam) == (1, 1, learner.dual.lam)
    assert state["counters"] == {"rollouts": 128}
    assert rng2.random() == expected_python and torch.equal(torch.rand(3), expected_torch)
    for a, b in zip(
        learner.optimizer.state_dict()["state"].values(),
        restored.optimizer.state_dict()["state"].values(),
        strict=False,
    ):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    for (name, a), b in zip(
        learner.policy.model.state_dict().items(), restored.policy.model.state_dict().values(), strict=False
    ):
        assert torch.equal(a, b), name


def test_only_complete_checkpoints_are_found_and_old_ones_pruned(tmp_path):
    learner = _learner()
    rng = random.Random(0)
    for _ in range(3):
        _step(learner)
        save_checkpoint(
            tmp_path, policy=learner.policy, optimizer=learner.optimizer, state=learner.state(), rng=rng
        )
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    (tmp_path / ".step-00000004.tmp").mkdir()  # a crash mid-write leaves only a hidden temp dir
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    assert latest_checkpoint(tmp_path / "missing") is None
