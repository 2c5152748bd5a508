"""trainer.dual: projected dual ascent on λ (DESIGN §5)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.dual import DualAscent

variances = st.floats(0.0, 1e6, allow_nan=False)


def test_additive_step_is_lr_times_excess_variance():
    dual = DualAscent(budget=0.04, lr=0.1, lam_max=10.0)
    assert dual.lam == 0.0
    assert dual.update(0.14) == pytest.approx(0.01)
    assert dual.update(torch.tensor(0.24)) == pytest.approx(0.03)


def test_lam_rises_while_variance_exceeds_budget_and_falls_to_zero_below():
    dual = DualAscent(budget=0.04, lr=0.5, lam_max=10.0)
    rising = [dual.update(0.5) for _ in range(5)]
    assert all(b > a for a, b in zip(rising, rising[1:], strict=False)) and rising[0] > 0
    falling = [dual.update(0.0) for _ in range(200)]
    assert all(b <= a for a, b in zip(falling, falling[1:], strict=False)) and falling[-1] == 0.0


def test_lam_saturates_at_lam_max():
    dual = DualAscent(budget=0.04, lr=1.0, lam_max=2.0)
    assert dual.update(100.0) == 2.0


@settings(max_examples=50, deadline=None)
@given(
    vs=st.lists(variances, max_size=30),
    lr=st.floats(0.0, 10.0),
    lam_max=st.floats(0.01, 20.0),
    mode=st.sampled_from(["additive", "multiplicative"]),
)
def test_lam_never_leaves_zero_to_lam_max(vs, lr, lam_max, mode):
    dual = DualAscent(budget=0.04, lr=lr, lam_max=lam_max, mode=mode)
    for v in vs:
        lam = dual.update(v)
        assert 0.0 <= lam <= lam_max and lam == dual.lam and math.isfinite(lam)


def test_multiplicative_rule_starts_from_the_floor_and_scales_by_exp():
    dual = DualAscent(budget=0.04, lr=0.5, lam_max=10.0, mode="multiplicative")
    assert dual.update(0.08) == pytest.approx(1e-3 * math.exp(0.5))  # V/budget − 1 = 1
    assert dual.update(0.04) == pytest.approx(1e-3 * math.exp(0.5))  # on budget: unchanged
    for _ in range(100):
        dual.update(0.0)
    assert dual.lam == pytest.approx(1e-3)  # floored, never stuck at 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, torch.tensor(math.nan), torch.ones(2)])
def test_update_rejects_non_finite_or_non_scalar_variance(bad):
    dual = DualAscent()
    with pytest.raises(ValueError, match="ratio_var must be"):
        dual.update(bad)
    assert dual.lam == 0.0


def test_update_reads_a_tensor_that_requires_grad():
    v = torch.tensor(1.04, requires_grad=True)
    assert DualAscent(lr=1.0).update(v * 1) == pytest.approx(1.0)


def test_state_dict_round_trip_restores_lam():
    dual = DualAscent(lr=0.3)
    for v in (0.5, 0.2, 0.9):
        dual.update(v)
    restored = DualAscent(lr=0.3)
    restored.load_state_dict(dual.state_dict())
    assert restored.lam == dual.lam and restored.num_updates == 3
    assert restored.update(0.1) == dual.update(0.1)
    assert all(isinstance(v, float) for v in dual.state_dict().values())


def test_load_state_dict_rejects_lam_outside_range():
    with pytest.raises(ValueError, match="outside"):
        DualAscent(lam_max=1.0).load_state_dict({"lam": 5.0})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 0.0}, "budget must be"),
        ({"budget": -1.0}, "budget must be"),
        ({"lr": -0.1}, "lr must be"),
        ({"lam_init": -1.0}, "lam_max >= lam_init >= 0"),
        ({"lam_max": 1.0, "lam_init": 2.0}, "lam_max >= lam_init >= 0"),
        ({"mode": "exp"}, "unknown mode 'exp'; choose one of: additive, multiplicative"),
        ({"mode": "multiplicative", "lam_floor": 0.0}, "lam_floor"),
    ],
)
def test_invalid_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DualAscent(**kwargs)


# --- study options: EMA of V̂, PID ---------------------------------------------------------------------


def test_ema_smooths_the_variance_the_step_uses():
    dual = DualAscent(budget=0.04, lr=1.0, lam_max=100.0, ema=0.9)
    assert dual.update(0.04) == pytest.approx(0.0)  # the first V̂ seeds the average
    lam = dual.update(10.04)  # v = 0.9·0.04 + 0.1·10.04 = 1.04
    assert dual.smoothed_var == pytest.approx(1.04)
    assert lam == pytest.approx(1.0)


def test_pid_is_integral_plus_proportional_plus_rising_derivative():
    dual = DualAscent(budget=0.1, lr=0.5, lam_max=100.0, mode="pid", kp=2.0, kd=1.0)
    # e = 0.4: I = 0.2, lam = 0.2 + 2·0.4 (no derivative on the first step)
    assert dual.update(0.5) == pytest.approx(1.0)
    # e = 0.9: I = 0.65, lam = 0.65 + 1.8 + 1·0.5
    assert dual.update(1.0) == pytest.approx(2.95)
    # e = -0.1: I = 0.6, lam = 0.6 - 0.2 + 0 (falls are not differentiated)
    assert dual.update(0.0) == pytest.approx(0.4)


def test_pid_with_zero_gains_is_the_additive_rule():
    a = DualAscent(budget=0.04, lr=0.3, mode="additive")
    b = DualAscent(budget=0.04, lr=0.3, mode="pid")
    for v in (0.5, 0.0, 1.2, 0.01, 0.0, 0.0):
        assert a.update(v) == pytest.approx(b.update(v))


def test_study_state_round_trips():
    dual = DualAscent(budget=0.04, lr=0.5, mode="pid", kp=1.0, kd=1.0, ema=0.5)
    for v in (0.3, 0.9, 0.1):
        dual.update(v)
    clone = DualAscent(budget=0.04, lr=0.5, mode="pid", kp=1.0, kd=1.0, ema=0.5)
    clone.load_state_dict(dual.state_dict())
    assert clone.update(0.7) == pytest.approx(dual.update(0.7))


@pytest.mark.parametrize("kwargs", [{"ema": 1.0}, {"ema": -0.1}, {"kp": -1.0}, {"kd": math.nan}])
def test_invalid_study_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        DualAscent(**kwargs)
