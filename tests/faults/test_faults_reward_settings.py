"""The reward service refuses configuration it does not know, as every other service does: a typo in an
`R2VPO_REWARD_*` variable stops `r2vpo serve reward` with exit code 2 naming it, instead of leaving a
setting silently unused; the variables it knows are read, and other services' variables are not its
business (one environment may be shared by every service, as the Kubernetes config map is)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
from harness import REPO, serve_command, wait_for
from pydantic import ValidationError

from services.redis_server import free_port
from services.reward import RewardSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def reward_process_env(tmp_path: Path, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command line of `r2vpo serve reward` (empty JSON config: settings from the environment only)
    and its environment: this one without any `R2VPO_REWARD_*` of the caller's, plus `env`."""
    config = tmp_path / "reward.json"
    config.write_text(json.dumps({}))
    base = {k: v for k, v in os.environ.items() if not k.startswith("R2VPO_REWARD_")}
    return serve_command("reward", config), base | {"COLUMNS": "250"} | env


def test_reward_env_typo_exits_2_naming_the_variable(tmp_path):
    command, env = reward_process_env(tmp_path, {"R2VPO_REWARD_PARTIAL_CREDT": "true"})
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "R2VPO_REWARD_PARTIAL_CREDT" in result.stderr
    assert "partial_credit" in result.stderr  # the fields are listed: the intended name is one look away


def test_reward_process_reads_its_env_and_ignores_other_services_variables(tmp_path):
    port = free_port()
    command, env = reward_process_env(
        tmp_path,
        {
            "R2VPO_REWARD_PORT": str(port),
            "R2VPO_REWARD_PLUGIN": "builtin:exact_match",
            "R2VPO_REWARD_LOG_LEVEL": "warning",
            "R2VPO_ROLLOUT_GROUP_SIZ": "4",  # another service's prefix: that service's to refuse
        },
    )
    log_path = tmp_path / "reward.log"
    with (
        log_path.open("wb") as log,
        subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT) as process,
    ):
        try:

            def health() -> dict | None:
                assert process.poll() is None, log_path.read_text()[-2000:]
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()

            answer = wait_for(health, 60, "the reward service on its env-configured port")
            assert answer["name"] == "exact_match"
        finally:
            process.kill()  # nothing to shut down gracefully; leaving the `with` waits for it


def test_reward_settings_refuse_unknown_keys_and_prefixed_env_typos(monkeypatch):
    with pytest.raises(ValidationError, match="no_such_key"):
        RewardSettings(no_such_key=1)
    monkeypatch.setenv("R2VPO_REWARD_PORTT", "1")
    with pytest.raises(ValidationError, match="R2VPO_REWARD_PORTT"):
        RewardSettings()
    monkeypatch.delenv("R2VPO_REWARD_PORTT")
    monkeypatch.setenv("R2VPO_REWARD_PORT", "1234")
    monkeypatch.setenv("R2VPO_REWARD_DATASET_PARAMS__max_terms", "3")  # nested, as for the other services
    settings = RewardSettings()
    assert (settings.port, settings.dataset_params) == (1234, {"max_terms": "3"})
