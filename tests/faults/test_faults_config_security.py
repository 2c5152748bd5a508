"""Bad configuration is refused at start with the key named; admin endpoints are never open by accident;
no byte that crosses a process boundary is unpickled or evaluated."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import redis.asyncio as aredis
from harness import REPO, serve_command
from pydantic import ValidationError

from services.dashboard.settings import DashboardSettings
from services.inference.settings import InferenceSettings
from services.learner.service import LearnerSettings
from services.rollout.worker import RolloutSettings
from services.settings import ServiceSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
SETTINGS = (InferenceSettings, LearnerSettings, RolloutSettings, DashboardSettings)


def serve(service: str, config: dict, *args: str, env: dict[str, str] | None = None, tmp_path: Path):
    path = tmp_path / f"{service}.json"
    path.write_text(json.dumps(config))
    env = os.environ | {"COLUMNS": "250"} | (env or {})
    return subprocess.run(
        serve_command(service, path, *args), cwd=REPO, env=env, capture_output=True, text=True, timeout=90
    )


def test_learner_config_with_typo_or_impossible_values_exits_2_naming_each_key(tmp_path):
    config = {
        "groups_per_stp": 4,
        "commit_every": 0,
        "learner": {"algo": "ppo2"},
        "redis_url": "http://h:pw@x",
    }
    result = serve("learner", config, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    for words in ("groups_per_stp", "Extra inputs are not permitted", "commit_every", "ppo2", "redis_url"):
        assert words in result.stderr, (words, result.stderr[-2000:])
    assert "pw" not in result.stderr.replace("ppo2", "")  # the password in the bad URL is not echoed


def test_unknown_prefixed_environment_variable_exits_2_naming_it(tmp_path):
    result = serve("rollout", {}, env={"R2VPO_ROLLOUT_GROUP_SIZ": "4"}, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "R2VPO_ROLLOUT_GROUP_SIZ" in result.stderr


@pytest.mark.parametrize("settings_cls", SETTINGS, ids=lambda c: c.__name__)
def test_every_service_refuses_unknown_keys_and_prefixed_env_typos(settings_cls, monkeypatch):
    with pytest.raises(ValidationError, match="no_such_key"):
        settings_cls(no_such_key=1)
    prefix = settings_cls.model_config["env_prefix"]
    monkeypatch.setenv(f"{prefix}PORTT", "1")
    with pytest.raises(ValidationError, match=f"{prefix}PORTT"):
        settings_cls()
    monkeypatch.delenv(f"{prefix}PORTT")
    monkeypatch.setenv(f"{prefix}PORT", "1234")  # a known one still works, other R2VPO_* are not checked
    monkeypatch.setenv("R2VPO_CACHE_DIR", "/tmp/x")
    assert settings_cls().port == 1234


def test_rediss_urls_are_accepted_and_other_schemes_refused():
    for url in (
        "redis://:pw@127.0.0.1:6379/0",
        "rediss://:pw@redis.example:6380/0",
        "unix:///run/redis.sock",
    ):
        assert ServiceSettings(redis_url=url).redis_url.get_secret_value() == url
    client = aredis.from_url("rediss://:pw@redis.example:6380/0")  # what connect_redis builds: TLS
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    with pytest.raises(ValidationError, match="redis_url") as info:
        ServiceSettings(redis_url="http://user:s3cret@h/0")
    assert "s3cret" not in str(info.value)


def test_inference_refuses_to_start_with_open_admin_endpoint_on_a_public_host(tmp_path):
    config = {"watch_weights": False, "model": str(tmp_path / "unused")}
    result = serve("inference", config, "--host", "0.0.0.0", tmp_path=tmp_path)
    assert result.returncode != 0
    assert "admin token" in result.stderr + result.stdout


# --- nothing unpickled, nothing evaluated ----------------------------------------------------------------

SOURCES = [p for d in ("client", "services", "trainer", "benchmarks") for p in (REPO / d).rglob("*.py")]
FORBIDDEN = {
    r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|shelve|marshal)\b": "a pickle-family module",
    r"\bpickle\.loads?\(": "pickle.load",
    r"allow_pickle\s*=\s*True": "numpy allow_pickle",
    r"\byaml\.load\(": "unsafe yaml.load",
    r"(?<![.\w])eval\(": "eval",
    r"(?<![.\w])exec\(": "exec",
    r"\b(sympify|parse_expr)\(": "sympy's eval-based parsing",
}


def test_no_pickle_or_eval_anywhere_bytes_cross_a_process_boundary():
    assert len(SOURCES) > 30
    found = []
    for path in SOURCES:
        text = path.read_text()
        for pattern, what in FORBIDDEN.items():
            for match in re.finditer(pattern, text, flags=re.MULTILINE):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(REPO)}:{line}: {what}")
        for match in re.finditer(r"(?<![\w.])torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in match.group(0):
                found.append(f"{path.relative_to(REPO)}: torch.load without weights_only=True")
    assert not found, found


INJECTIONS = [
    "__import__('os').system('touch {marker}')",
    "$__import__('os').system('touch {marker}')$",
    "\\boxed{{__import__('os').system('touch {marker}')}}",
    "1+__import__('os').system('touch {marker}')",
]


@pytest.mark.parametrize("name", ["reasoning_gym", "exact_match", "math_verify"])
def test_builtin_scorers_never_evaluate_model_output(name, tmp_path):
    from services.reward.builtins import builtin_scorer

    marker = tmp_path / "pwned"
    scorer = builtin_scorer(name, timeout_s=10.0)
    entry = {"question": "1+2=", "answer": "3", "metadata": {}}
    try:
        for template in INJECTIONS:
            completion = template.format(marker=marker)
            try:
                score = scorer("1+2=", completion, {"answer": "3", "entry": entry})
            except Exception:  # noqa: BLE001 - an error is fine; running the code is not
                continue
            assert score.reward == 0.0
    finally:
        close = getattr(scorer, "close", None)
        if callable(close):
            close()
    assert not marker.exists()
