"""The synchronous trainer end to end on the embedded default policy (small enough for CI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainer.learner import LearnerConfig
from trainer.sync import SyncTrainConfig, run_sync

pytestmark = pytest.mark.e2e


def _config(tmp_path, default_policy_dir, **overrides) -> SyncTrainConfig:
    values = {"run_dir": tmp_path / "run", "model": default_policy_dir, "steps": 40, "eval_every": 20}
    return SyncTrainConfig.model_validate(values | overrides)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("algo", ["r2vpo", "grpo"])
def test_short_run_raises_reward_and_accuracy(tmp_path, default_policy_dir, algo):
    cfg = _config(tmp_path, default_policy_dir, learner=LearnerConfig(algo=algo))
    summary = run_sync(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    # Held-out greedy reward (exact match on 200 unseen problems; one evaluation has s.e. ~0.035).
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.1, summary
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)
    assert summary["rollouts_consumed"] == 40 * 16 * 8
    for key in ("algo", "steps", "initial_accuracy", "final_accuracy", "rollouts_consumed", "wall_time_s"):
        assert key in json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["staleness_histogram"] == {0: 40 * 128}
    assert all(r["logp_mismatch_max"] < 1e-3 for r in rows), "sampler and learner log-probs disagree"
    for key in ("ratio_mean", "ratio_var", "ratio_max", "ess", "would_clip_frac", "grad_norm", "entropy"):
        assert key in rows[-1]


@pytest.mark.timeout(300)
def test_forced_lag_trains_on_samples_that_many_versions_old(tmp_path, default_policy_dir):
    cfg = _config(tmp_path, default_policy_dir, steps=8, lag=3, eval_every=100)
    summary = run_sync(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    # the delay line starts full of version-0 batches: lags 0, 1, 2, then 3 from the fourth update on
    assert [min(map(int, r["staleness_histogram"])) for r in rows] == [0, 1, 2, 3, 3, 3, 3, 3]
    assert summary["staleness_histogram"][3] == 5 * 128
    assert rows[-1]["ratio_var"] > 0  # stale samples: the ratio is no longer identically 1


@pytest.mark.timeout(300)
def test_same_seed_same_run(tmp_path, default_policy_dir):
    a = run_sync(_config(tmp_path / "a", default_policy_dir, steps=4, eval_every=100))
    b = run_sync(_config(tmp_path / "b", default_policy_dir, steps=4, eval_every=100))
    rows_a = (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()
    rows_b = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [[json.loads(r)["loss"] for r in rows] for rows in (rows_a, rows_b)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert a["final_accuracy"] == b["final_accuracy"]


@pytest.mark.timeout(300)
def test_resumed_run_continues_from_the_same_version(tmp_path, default_policy_dir):
    cfg = _config(tmp_path, default_policy_dir, steps=3, eval_every=100, checkpoint_every=1)
    first = run_sync(cfg)
    assert first["version"] == 3
    resumed = run_sync(cfg.model_copy(update={"steps": 5}), resume=True)
    assert resumed["version"] == 5 and resumed["optimizer_steps"] == 5
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5]
    assert resumed["rollouts_consumed"] == 5 * 128


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--algo", "nope"], "unknown algorithm 'nope'"),
        (["--task", "no_such_task"], "no_such_task"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
        (["--steps", "0"], "steps"),
    ],
)
def test_cli_refuses_bad_input_with_a_clear_message(tmp_path, args, message):
    result = _cli("train", "--sync", "--run-dir", str(tmp_path / "run"), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


@pytest.mark.timeout(600)
def test_cli_train_writes_the_run_directory(tmp_path, default_policy_dir):
    run_dir = tmp_path / "cli"
    result = _cli("train", "--sync", "--algo", "dapo", "--steps", "3", "--eval-every", "3", "--lag", "1",
                  "--model", str(default_policy_dir), "--run-dir", str(run_dir))  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == "dapo" and summary["steps"] == 3 and summary["lag"] == 1
    assert "held-out accuracy" in result.stderr
