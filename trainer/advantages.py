"""Group-normalised advantages (DESIGN §5: A_j is the group-normalised reward of its completion).

    grpo:    A = (r − mean_g r) / (std_g r + eps)     population std (unbiased=False)
    drgrpo:  A = r − mean_g r                         Dr. GRPO: centred, not scaled

A group whose rewards are all equal (within ZERO_VAR_TOL) carries no learning signal: its advantages are
exactly 0 and it is flagged in ``zero_var_groups`` so the caller can drop it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("grpo", "drgrpo")
ZERO_VAR_TOL = 1e-8


@dataclass(frozen=True)
class AdvantageOutput:
    advantages: Tensor  # [num_groups, G]
    zero_var_groups: Tensor  # bool [num_groups]


def _as_tensor(rewards: Tensor | Sequence[Sequence[float]]) -> Tensor:
    if not isinstance(rewards, Tensor):
        sizes = {len(group) for group in rewards}
        if len(sizes) > 1:
            raise ValueError(f"ragged groups: sizes {sorted(sizes)}; every group must have the same size")
        rewards = torch.tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty 2-D [num_groups, G], got shape {list(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")
    return rewards


def group_advantages(
    rewards: Tensor | Sequence[Sequence[float]], *, kind: str = "grpo", eps: float = 1e-6
) -> AdvantageOutput:
    """Advantages of each completion against its group; ``rewards`` is [num_groups, G]."""
    if kind not in KINDS:
        raise ValueError(f"unknown advantage kind {kind!r}; choose one of: {', '.join(KINDS)}")
    rewards = _as_tensor(rewards)
    zero_var = (rewards.amax(dim=1) - rewards.amin(dim=1)) <= ZERO_VAR_TOL
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if kind == "grpo":
        adv = adv / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)
    adv = torch.where(zero_var.unsqueeze(1), 0.0, adv)
    return AdvantageOutput(advantages=adv, zero_var_groups=zero_var)
