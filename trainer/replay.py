"""A version-aware replay buffer of recent trajectory groups, so R²VPO can reuse stale samples.

Groups are kept until they are more than `max_age` versions behind the learner or the buffer is full
(oldest evicted first). Reuse is explicit: the learner asks for k replayed groups per batch.
"""

from __future__ import annotations

import random
from collections import deque

from pydantic import BaseModel, ConfigDict, Field

from client.schemas import TrajectoryGroup


class ReplayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    capacity: int = Field(0, ge=0, description="groups kept for reuse; 0 disables replay")
    max_age: int = Field(8, ge=0, description="evict groups more than this many versions old")
    groups_per_batch: int = Field(0, ge=0, description="replayed groups added to each fresh batch")


class ReplayBuffer:
    def __init__(self, config: ReplayConfig) -> None:
        self.config = config
        self._groups: deque[TrajectoryGroup] = deque()

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, groups: list[TrajectoryGroup]) -> None:
        if self.config.capacity == 0:
            return
        self._groups.extend(groups)
        while len(self._groups) > self.config.capacity:
            self._groups.popleft()

    def evict_older_than(self, current_version: int) -> int:
        """Drop groups more than `max_age` versions old; returns how many were dropped."""
        before = len(self._groups)
        self._groups = deque(
            g for g in self._groups if current_version - g.policy_version <= self.config.max_age
        )
        return before - len(self._groups)

    def sample(self, rng: random.Random, exclude: set[str] | None = None) -> list[TrajectoryGroup]:
        """Up to `groups_per_batch` distinct groups, never one whose id is in `exclude`."""
        candidates = [g for g in self._groups if not exclude or g.group_id not in exclude]
        k = min(self.config.groups_per_batch, len(candidates))
        return rng.sample(candidates, k)
