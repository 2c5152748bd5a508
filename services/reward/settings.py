"""Settings of the reward service (env prefix `R2VPO_REWARD_`): unknown keys and unknown `R2VPO_REWARD_*`
variables are errors naming the key, as for every service (`services.settings.StrictSettings`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from services.reward.builtins import BUILTINS
from services.settings import StrictSettings


class RewardSettings(StrictSettings, env_prefix="R2VPO_REWARD_"):
    """Which scorer the reward service runs and how.

    `plugin` is `builtin:<name>` (`reasoning_gym`, `exact_match`, `math_verify`) or `module:function`
    for a user plug-in. `reward_range` is enforced for the built-ins by default; for a user plug-in only
    when set explicitly (argument or `R2VPO_REWARD_REWARD_RANGE='[lo, hi]'`). The service uses no Redis,
    so it has no `run`, `redis_url` or `admin_token` (a `ServiceSettings` would accept and ignore them).
    """

    host: str = "127.0.0.1"
    port: int = Field(8002, ge=0, le=65535)
    log_level: str = "info"
    plugin: str = "builtin:reasoning_gym"
    dataset: str = "chain_sum"
    dataset_params: dict[str, Any] = Field(default_factory=dict)
    partial_credit: bool = False
    reward_range: tuple[float, float] | None = (0.0, 1.0)
    timeout_s: float = Field(5.0, gt=0)

    @field_validator("plugin")
    @classmethod
    def _plugin_spec(cls, value: str) -> str:
        if value.startswith("builtin:"):
            if value.removeprefix("builtin:") not in BUILTINS:
                raise ValueError(f"unknown built-in {value!r}; built-ins: {', '.join(BUILTINS)}")
        elif value.count(":") != 1 or not all(value.split(":")):
            raise ValueError(f"plugin must be 'builtin:<name>' or 'module:function', got {value!r}")
        return value

    @model_validator(mode="after")
    def _range_ordered(self) -> RewardSettings:
        if self.reward_range is not None and not self.reward_range[0] <= self.reward_range[1]:
            raise ValueError(f"reward_range must be (lo, hi) with lo <= hi, got {self.reward_range}")
        return self

    @property
    def effective_reward_range(self) -> tuple[float, float] | None:
        """The range the service enforces (see the class docstring)."""
        if self.plugin.startswith("builtin:") or "reward_range" in self.model_fields_set:
            return self.reward_range
        return None
