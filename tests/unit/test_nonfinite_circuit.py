"""The circuit stop for non-finite updates (`trainer.circuit`): its count, its settings, and the sync trainer
aborting a run whose every update is non-finite, through `r2vpo train` as a real process (a real model whose
gradient norm overflows, see `test_learner_guards.overflowing`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_learner_guards import overflowing

from services.learner.settings import LearnerSettings
from trainer.circuit import NonFiniteCircuit, NonFiniteStreak
from trainer.policy import Policy
from trainer.sync import SyncTrainConfig

REPO = Path(__file__).resolve().parents[2]


def test_consecutive_nonfinite_batches_trip_and_an_applied_batch_resets_the_count():
    circuit = NonFiniteCircuit(limit=3)
    for applied, reason in [(False, "a"), (False, "b"), (True, None), (False, "c"), (False, "d")]:
        circuit.record(applied=applied, skip_reason=reason)
        circuit.check()  # never three in a row
    circuit.record(applied=False, skip_reason=None)  # nothing trained (every group stale): no change
    assert (circuit.streak, circuit.last_reason, circuit.tripped) == (2, "d", False)
    circuit.record(applied=False, skip_reason="non-finite loss (step 4)")
    last = r"the last one: non-finite loss \(step 4\)"
    with pytest.raises(NonFiniteStreak, match=rf"^3 consecutive batches .*=3\); {last}"):
        circuit.check()
    resumed = NonFiniteCircuit(limit=3)
    resumed.restore(circuit.state())  # what a restarted learner service reads back from Redis
    assert (resumed.streak, resumed.last_reason) == (3, "non-finite loss (step 4)") and resumed.tripped
    fresh = NonFiniteCircuit(limit=3)
    fresh.restore({})
    assert fresh.streak == 0 and not fresh.tripped


@pytest.mark.parametrize("config", [SyncTrainConfig, LearnerSettings])
def test_max_consecutive_nonfinite_is_at_least_one(config):
    assert config().max_consecutive_nonfinite == 5
    with pytest.raises(ValidationError, match="max_consecutive_nonfinite"):
        config(max_consecutive_nonfinite=0)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sync_train_stops_with_a_clear_error_after_nonfinite_batches_in_a_row(tmp_path, default_policy_dir):
    overflowing(Policy.from_pretrained(default_policy_dir)).save(tmp_path / "model")
    config = {"max_consecutive_nonfinite": 3, "task": {"heldout_size": 10}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    command = [sys.executable, "-m", "services.cli", "train", "--model", str(tmp_path / "model"),
               "--steps", "8", "--prompts-per-batch", "4", "--group-size", "4", "--eval-every", "100",
               "--run-dir", str(tmp_path / "run"), "--config", str(tmp_path / "config.json")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240,
                            env=os.environ | {"COLUMNS": "400"})  # fmt: skip

    assert result.returncode == 2, result.stderr[-3000:]
    error = " ".join(result.stderr.split())
    assert "run aborted at batch 3 of 8" in error, error[-3000:]
    assert "error: 3 consecutive batches were not applied" in error
    assert "the last one: non-finite gradient norm" in error and "Traceback" not in error
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""  # no batch was applied
    assert not (tmp_path / "run" / "summary.json").exists()
