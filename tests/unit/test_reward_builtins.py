"""Built-in scorers, the SDK's result checks, plug-in loading, reward settings and the circuit breaker."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import reasoning_gym
from pydantic import ValidationError

from client.plugin import PluginLoadError, Score, ScoringError, as_score, load_plugin
from client.reward import CircuitBreaker, RewardError
from services.reward.builtins import (
    MathVerifyScorer,
    builtin_scorer,
    combine,
    exact_match,
    format_shaping,
    length_penalty,
    reasoning_gym_scorer,
)
from services.reward.settings import RewardSettings

pytestmark = pytest.mark.timeout(60)

ENTRY = {"question": "5 + 9 =", "answer": "14", "metadata": {}}


def test_chain_sum_scorer_gives_exact_credit_by_default_and_partial_on_request():
    exact = reasoning_gym_scorer("chain_sum")
    partial = reasoning_gym_scorer("chain_sum", partial_credit=True)
    meta = {"entry": ENTRY}
    assert exact("q", " 14\n", meta).reward == 1.0
    assert exact("q", "140", meta).reward == 0.0
    assert exact("q", "140", meta).details["score"] == pytest.approx(2 / 3)
    assert partial("q", "140", meta).reward == pytest.approx(2 / 3)
    assert partial("q", "7", meta).reward == 0.0


def test_chain_sum_scorer_uses_real_dataset_entries_after_a_json_round_trip():
    import json

    dataset = reasoning_gym.create_dataset("chain_sum", size=5, seed=1, min_terms=2, max_terms=3)
    scorer = reasoning_gym_scorer("chain_sum", min_terms=2, max_terms=3)
    for entry in dataset:
        meta = {"entry": json.loads(json.dumps(entry))}
        assert scorer("q", entry["answer"], meta).reward == 1.0
        assert scorer("q", entry["answer"] + "1", meta).reward == 0.0


def test_reasoning_gym_scorer_errors_without_entry_and_on_unknown_dataset():
    scorer = reasoning_gym_scorer("chain_sum")
    with pytest.raises(ValueError, match="metadata\\['entry'\\]"):
        scorer("q", "14", {})
    with pytest.raises(ValueError):
        reasoning_gym_scorer("no_such_dataset")


def test_exact_match_compares_stripped_completion_with_answer():
    assert exact_match("q", "  42\n", {"answer": "42"}).reward == 1.0
    assert exact_match("q", "42.0", {"answer": "42"}).reward == 0.0
    assert exact_match("q", "7", {"answer": 7}).reward == 1.0
    with pytest.raises(ValueError, match="answer"):
        exact_match("q", "42", {})


def test_math_verify_finds_equivalent_forms_and_rejects_wrong_ones():
    scorer = MathVerifyScorer(timeout_s=30)
    try:
        assert scorer("q", "0.5", {"answer": "\\frac{1}{2}"}).reward == 1.0
        assert scorer("q", "The answer is $\\boxed{\\frac12}$", {"answer": "1/2"}).reward == 1.0
        assert scorer("q", "0.6", {"answer": "\\frac{1}{2}"}).reward == 0.0
        assert scorer("q", "no idea", {"answer": "3"}).reward == 0.0
        with pytest.raises(ValueError, match="reference answer"):
            scorer("q", "1", {"answer": ""})
        with pytest.raises(ValueError, match="answer"):
            scorer("q", "1", {})
    finally:
        scorer.close()


def test_shaping_terms_and_combine_weights():
    penalty = length_penalty(max_chars=4, weight=0.5)
    assert penalty("q", "1234", {}).reward == 0.0
    assert penalty("q", "123456", {}).reward == pytest.approx(-0.25)
    assert penalty("q", "x" * 100, {}).reward == pytest.approx(-0.5)
    shaping = format_shaping(weight=0.1)
    assert shaping("q", " -12 ", {}).reward == pytest.approx(0.1)
    assert shaping("q", "twelve", {}).reward == 0.0

    total = combine([(exact_match, 1.0), (shaping, 0.5), (lambda p, c, m: 2.0, -0.25)])
    result = total("q", "12", {"answer": "12"})
    assert result.reward == pytest.approx(1.0 + 0.05 - 0.5)
    parts = result.details["parts"]
    assert [p["name"] for p in parts] == ["exact_match", "format_shaping", "<lambda>"]
    assert [p["weight"] for p in parts] == [1.0, 0.5, -0.25]
    assert [p["reward"] for p in parts] == [1.0, 0.1, 2.0]


def test_combine_rejects_async_parts_and_a_part_error_stays_an_error():
    async def judge(prompt: str, completion: str, metadata: dict) -> float:
        return 1.0

    with pytest.raises(TypeError, match="sync"):
        combine([(judge, 1.0)])
    with pytest.raises(ScoringError, match="non-finite"):
        combine([(lambda p, c, m: math.nan, 1.0)])("q", "c", {})


def test_builtin_scorer_names():
    assert builtin_scorer("exact_match") is exact_match
    assert builtin_scorer("reasoning_gym", dataset="chain_sum")("q", "14", {"entry": ENTRY}).reward == 1.0
    with pytest.raises(ValueError, match="built-ins"):
        builtin_scorer("nope")


@pytest.mark.parametrize(
    ("value", "kind"),
    [(math.nan, "non_finite"), (-math.inf, "non_finite"), ("1", "not_a_number"), (None, "not_a_number"),
     (1.5, "out_of_range"), (Score(reward=-0.1), "out_of_range")],
)  # fmt: skip
def test_as_score_rejects_bad_results(value, kind):
    with pytest.raises(ScoringError) as err:
        as_score(value, (0.0, 1.0))
    assert (err.value.status_code, err.value.kind) == (500, kind)


def test_as_score_accepts_numbers_bools_and_scores():
    assert as_score(1).reward == 1.0
    assert as_score(True).reward == 1.0
    assert as_score(Score(reward=0.25, details={"x": (1, 2)})) == Score(reward=0.25, details={"x": [1, 2]})


def test_load_plugin_gives_clear_errors(tmp_path, monkeypatch):
    source = "VALUE = 3\nclass Judge:\n    def score(self, p, c, m):\n        return 1.0\njudge = Judge()\n"
    (tmp_path / "plugin_mod.py").write_text(source)
    (tmp_path / "plugin_broken.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_plugin("plugin_mod:judge.score")("p", "c", {}) == 1.0
    assert load_plugin("services.reward.builtins:exact_match") is exact_match
    with pytest.raises(PluginLoadError, match="'module:function'"):
        load_plugin("plugin_mod")
    with pytest.raises(PluginLoadError, match="module 'no_such_module_xyz' not found"):
        load_plugin("no_such_module_xyz:score")
    with pytest.raises(PluginLoadError, match="missing module 'not_installed_dependency_xyz'"):
        load_plugin("plugin_broken:score")
    with pytest.raises(PluginLoadError, match="has no attribute 'missing'"):
        load_plugin("plugin_mod:missing")
    with pytest.raises(PluginLoadError, match="not a callable"):
        load_plugin("plugin_mod:VALUE")


def test_reward_settings_read_env_and_reject_unknown_keys(monkeypatch):
    monkeypatch.setenv("R2VPO_REWARD_PORT", "9100")
    monkeypatch.setenv("R2VPO_REWARD_PARTIAL_CREDIT", "true")
    monkeypatch.setenv("R2VPO_REWARD_REWARD_RANGE", "[-1, 1]")
    settings = RewardSettings()
    assert (settings.port, settings.partial_credit, settings.reward_range) == (9100, True, (-1.0, 1.0))
    assert RewardSettings(plugin="pkg.mod:fn").effective_reward_range == (-1.0, 1.0)  # set via env: enforced
    monkeypatch.delenv("R2VPO_REWARD_REWARD_RANGE")
    assert RewardSettings().effective_reward_range == (0.0, 1.0)
    assert RewardSettings(plugin="pkg.mod:fn").effective_reward_range is None
    for bad in (
        {"plugin": "builtin:nope"},
        {"plugin": "justamodule"},
        {"reward_range": (1, 0)},
        {"colour": 1},
    ):
        with pytest.raises(ValidationError):
            RewardSettings(**bad)


def test_client_package_imports_no_torch():
    code = "import sys, client.reward, client.plugin, client.schemas; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_circuit_breaker_state_machine_with_a_fake_clock():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=5.0, clock=lambda: now[0])
    failure, client_error = RewardError("timeout", "slow"), RewardError("http", "bad", status_code=400)
    breaker.before_call()
    breaker.record(failure)
    breaker.before_call()
    breaker.record(client_error)  # a 4xx shows the service is up: resets the count
    for _ in range(2):
        breaker.before_call()
        breaker.record(failure)
    assert breaker.state == "open"
    with pytest.raises(RewardError, match="circuit_open"):
        breaker.before_call()
    now[0] = 5.0
    assert breaker.state == "half_open"
    breaker.before_call()  # the one probe
    with pytest.raises(RewardError, match="circuit_open"):
        breaker.before_call()  # a second caller while the probe is out
    breaker.record(failure)  # probe failed: open again for another reset_after_s
    assert breaker.state == "open"
    now[0] = 10.0
    breaker.before_call()
    breaker.record(None)
    assert breaker.state == "closed"
    breaker.before_call()
