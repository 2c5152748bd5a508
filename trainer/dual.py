"""The dual variable λ of R²VPO's variance budget (DESIGN §5).

    additive (DESIGN §5):    lam ← clip(lam + lr·(V̂ − budget), 0, lam_max)
    multiplicative (study):  lam ← clip(max(lam, lam_floor)·exp(lr·(V̂/budget − 1)), lam_floor, lam_max)

V̂ is the detached ratio variance of the step (``LossOutput.ratio_var``); the update runs once per
optimizer step. A multiplicative update from 0 stays at 0 for ever, so that rule works from (and never
falls below) ``lam_floor`` = 1e-3: λ lives in [lam_floor, lam_max] after its first multiplicative update.
"""

from __future__ import annotations

import math

import torch

MODES = ("additive", "multiplicative")
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
        self.budget, self.lr, self.lam_max, self.mode, self.lam_floor = budget, lr, lam_max, mode, lam_floor
        self._lam = float(lam_init)
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
        if self.mode == "additive":
            lam = self._lam + self.lr * (V - self.budget)
            self._lam = min(max(lam, 0.0), self.lam_max)
        else:
            log_step = min(self.lr * (V / self.budget - 1.0), _MAX_LOG_STEP)
            lam = max(self._lam, self.lam_floor) * math.exp(log_step)
            self._lam = min(max(lam, self.lam_floor), self.lam_max)
        self.num_updates += 1
        return self._lam

    def state_dict(self) -> dict[str, float]:
        return {"lam": self._lam, "num_updates": float(self.num_updates)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        lam = float(state["lam"])
        if not (math.isfinite(lam) and 0 <= lam <= self.lam_max):
            raise ValueError(f"checkpointed lam={lam} is outside [0, lam_max={self.lam_max}]")
        self._lam = lam
        self.num_updates = int(state.get("num_updates", 0))
