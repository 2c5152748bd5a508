"""The dual variable λ of R²VPO's variance budget (DESIGN §5).

    additive (DESIGN §5):    lam ← clip(lam + lr·(V̂ − budget), 0, lam_max)
    multiplicative (study):  lam ← clip(max(lam, lam_floor)·exp(lr·(V̂/budget − 1)), lam_floor, lam_max)
    pid (study):             I ← clip(I + lr·e, 0, lam_max)      e = V̂ − budget (PID Lagrangian, Stooke 2020)
                             lam ← clip(I + kp·e + kd·max(0, e − e_prev), 0, lam_max)

``ema`` ∈ [0, 1) replaces V̂ by its exponential moving average v ← ema·v + (1 − ema)·V̂ (first v = V̂), so one
heavy-tailed batch moves λ by (1 − ema) of its violation instead of all of it.

V̂ is the detached ratio variance of the step (``LossOutput.ratio_var``); the update runs once per
optimizer step. A multiplicative update from 0 stays at 0 for ever, so that rule works from (and never
falls below) ``lam_floor`` = 1e-3: λ lives in [lam_floor, lam_max] after its first multiplicative update.
"""

from __future__ import annotations

import math

import torch

MODES = ("additive", "multiplicative", "pid")
_MAX_LOG_STEP = 50.0  # caps the multiplicative exponent so math.exp cannot overflow


class DualAscent:
    """Projected dual ascent on lam for the constraint V ≤ budget."""

    def __init__(
        self,
        budget: float = 0.04,
        lr: float = 0.1,
        lam_max: float = 10.0,
        lam_init: float = 0.0,
        *,
        mode: str = "additive",
        lam_floor: float = 1e-3,
        ema: float = 0.0,
        kp: float = 0.0,
        kd: float = 0.0,
    ) -> None:
        if not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget must be a finite number > 0, got {budget}")
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr}")
        if not (math.isfinite(lam_max) and lam_max >= lam_init >= 0):
            raise ValueError(f"need lam_max >= lam_init >= 0, got lam_max={lam_max}, lam_init={lam_init}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        if mode == "multiplicative" and not 0 < lam_floor <= lam_max:
            raise ValueError(f"need 0 < lam_floor <= lam_max, got lam_floor={lam_floor}, lam_max={lam_max}")
        if not (math.isfinite(ema) and 0 <= ema < 1):
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if not (math.isfinite(kp) and kp >= 0 and math.isfinite(kd) and kd >= 0):
            raise ValueError(f"need kp >= 0 and kd >= 0, got kp={kp}, kd={kd}")
        self.budget, self.lr, self.lam_max, self.mode, self.lam_floor = budget, lr, lam_max, mode, lam_floor
        self.ema, self.kp, self.kd = ema, kp, kd
        self._lam = float(lam_init)
        self._integral = float(lam_init)  # pid: the additive (integral) part of lam
        self._prev_error: float | None = None
        self._v_ema: float | None = None
        self.num_updates = 0

    @property
    def lam(self) -> float:
        return self._lam

    def update(self, ratio_var: float | torch.Tensor) -> float:
        """One dual step from the step's detached ratio variance V̂; returns the new lam."""
        if isinstance(ratio_var, torch.Tensor):
            if ratio_var.numel() != 1:
                raise ValueError(f"ratio_var must be a scalar, got shape {list(ratio_var.shape)}")
            ratio_var = ratio_var.detach().item()
        V = float(ratio_var)
        if not math.isfinite(V):
            raise ValueError(f"ratio_var must be finite, got {V}")
        self._v_ema = V if self._v_ema is None else self.ema * self._v_ema + (1 - self.ema) * V
        V = self._v_ema
        if self.mode == "additive":
            lam = self._lam + self.lr * (V - self.budget)
            self._lam = min(max(lam, 0.0), self.lam_max)
        elif self.mode == "pid":
            error = V - self.budget
            self._integral = min(max(self._integral + self.lr * error, 0.0), self.lam_max)
            derivative = 0.0 if self._prev_error is None else max(0.0, error - self._prev_error)
            self._prev_error = error
            lam = self._integral + self.kp * error + self.kd * derivative
            self._lam = min(max(lam, 0.0), self.lam_max)
        else:
            log_step = min(self.lr * (V / self.budget - 1.0), _MAX_LOG_STEP)
            lam = max(self._lam, self.lam_floor) * math.exp(log_step)
            self._lam = min(max(lam, self.lam_floor), self.lam_max)
        self.num_updates += 1
        return self._lam

    @property
    def smoothed_var(self) -> float | None:
        """The V̂ the last update used (its EMA when ema > 0); None before the first update."""
        return self._v_ema

    def state_dict(self) -> dict[str, float]:
        state = {"lam": self._lam, "num_updates": float(self.num_updates), "integral": self._integral}
        if self._v_ema is not None:
            state["v_ema"] = self._v_ema
        if self._prev_error is not None:
            state["prev_error"] = self._prev_error
        return state

    def load_state_dict(self, state: dict[str, float]) -> None:
        lam = float(state["lam"])
        if not (math.isfinite(lam) and 0 <= lam <= self.lam_max):
            raise ValueError(f"checkpointed lam={lam} is outside [0, lam_max={self.lam_max}]")
        self._lam = lam
        self.num_updates = int(state.get("num_updates", 0))
        self._integral = float(state.get("integral", lam))
        self._v_ema = float(state["v_ema"]) if "v_ema" in state else None
        self._prev_error = float(state["prev_error"]) if "prev_error" in state else None
