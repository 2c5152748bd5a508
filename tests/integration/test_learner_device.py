"""The learner's `device` setting from the command line and the environment, as real processes: `cpu` and
`auto` train end to end here (no GPU), and a GPU that is not there is refused at start with a message naming
the setting, exit code 2 and no traceback, before any model is loaded or any run directory is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
REPO = Path(__file__).resolve().parents[2]


def r2vpo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "services.cli", *args]
    env = os.environ | {"COLUMNS": "250"} | (env or {})
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)


@NO_CUDA
def test_train_refuses_a_missing_gpu_before_any_work(tmp_path):
    result = r2vpo("train", "--device", "cuda", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "learner.device is 'cuda' but" in result.stderr and "set it to 'cpu' or 'auto'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_train_refuses_a_misspelled_device_naming_the_choices(tmp_path):
    result = r2vpo("train", "--device", "gpu0", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "learner.device" in result.stderr and "'cpu', 'cuda', 'cuda:N' or 'auto'" in result.stderr


@NO_CUDA
@pytest.mark.parametrize("how", ["config", "env"])
def test_serve_learner_refuses_a_missing_gpu_at_start(tmp_path, how):
    config = {"run_dir": str(tmp_path / "run"), "redis_url": "redis://127.0.0.1:1/0"}  # never reached
    env = {"R2VPO_LEARNER_LEARNER__DEVICE": "cuda:1"} if how == "env" else {}
    if how == "config":
        config["learner"] = {"device": "cuda:1"}
    (tmp_path / "learner.json").write_text(json.dumps(config))
    result = r2vpo("serve", "learner", "--config", str(tmp_path / "learner.json"), env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the learner cannot start: learner.device is 'cuda:1' but" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_serve_learner_refuses_a_misspelled_device_from_the_environment(tmp_path):
    (tmp_path / "learner.json").write_text(json.dumps({"run_dir": str(tmp_path / "run")}))
    env = {"R2VPO_LEARNER_LEARNER__DEVICE": "gpu"}
    result = r2vpo("serve", "learner", "--config", str(tmp_path / "learner.json"), env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "learner.device" in result.stderr and "'cpu', 'cuda', 'cuda:N' or 'auto'" in result.stderr


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_train_on_the_configured_device_end_to_end(tmp_path, default_policy_dir, device):
    (tmp_path / "base.json").write_text(json.dumps({"task": {"heldout_size": 10}}))
    run_dir = tmp_path / "run"
    result = r2vpo("train", "--device", device, "--steps", "2", "--prompts-per-batch", "4",
                   "--group-size", "4", "--eval-every", "2", "--model", str(default_policy_dir),
                   "--run-dir", str(run_dir), "--config", str(tmp_path / "base.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = "cuda:0" if device == "auto" and torch.cuda.is_available() else "cpu"
    assert summary["device"] == expected and summary["optimizer_steps"] == 2
    assert summary["skipped_batches"] == 0
    assert json.loads((run_dir / "config.json").read_text())["learner"]["device"] == device
    assert (run_dir / "checkpoints" / "latest").is_file()
