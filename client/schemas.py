"""Wire contracts (DESIGN §3): what crosses a process boundary, as pydantic models.

Everything here serialises to JSON (or msgpack of the same dict); nothing is ever pickled.
No torch import: a reward plug-in author installs only pydantic and httpx.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class WireModel(BaseModel):
    """Strict base: unknown fields are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid")


# --- completions (OpenAI-compatible, plus the fields RL needs) --------------------------------------


class CompletionRequest(BaseModel):
    """`POST /v1/completions`. Extra OpenAI fields are accepted and ignored (any OpenAI client works)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    n: int = Field(1, ge=1, le=64)
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    logprobs: int | None = Field(None, ge=0, le=5)
    seed: int | None = None


class CompletionLogprobs(WireModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(WireModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None = None
    # r2vpo additions: the sampled token ids, their log-probs (of the tempered distribution actually
    # sampled from), and the policy version that produced them.
    token_ids: list[int]
    prompt_token_ids: list[int]
    policy_version: int


class CompletionUsage(WireModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(WireModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class ModelCard(WireModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "r2vpo"
    policy_version: int


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- reward plug-ins -----------------------------------------------------------------------------


class ScoreRequest(WireModel):
    id: str
    prompt: str
    completion: str
    task: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)


class ScoreResponse(WireModel):
    reward: float
    details: dict[str, Any] = Field(default_factory=dict)
    status: Literal["ok"] = "ok"

    @field_validator("reward")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"reward must be a finite number, got {value}")
        return value


class ScoreBatchRequest(WireModel):
    items: list[ScoreRequest] = Field(min_length=1, max_length=1024)


class ScoreBatchResponse(WireModel):
    results: list[ScoreResponse]


class ErrorResponse(WireModel):
    status: Literal["error"] = "error"
    error: str
    detail: Any = None


# --- trajectories --------------------------------------------------------------------------------


class Completion(WireModel):
    """One sampled completion of a group, with everything the learner needs."""

    token_ids: list[int] = Field(min_length=1)
    behavior_logprobs: list[float]
    reward: float
    policy_version: int = Field(ge=0)
    text: str = ""
    finish_reason: Literal["stop", "length"] = "stop"

    @model_validator(mode="after")
    def _consistent(self) -> Completion:
        if len(self.token_ids) != len(self.behavior_logprobs):
            raise ValueError(
                f"token_ids has {len(self.token_ids)} entries but behavior_logprobs has "
                f"{len(self.behavior_logprobs)}"
            )
        if not math.isfinite(self.reward):
            raise ValueError(f"reward must be finite, got {self.reward}")
        bad = [x for x in self.behavior_logprobs if not (math.isfinite(x) and x <= 1e-4)]
        if bad:
            raise ValueError(f"behavior_logprobs must be finite log-probabilities (<= 0), got {bad[:3]}")
        return self


class TrajectoryGroup(WireModel):
    """One prompt and its G completions (DESIGN §3). `policy_version` is the oldest that generated any."""

    group_id: str = Field(min_length=1, max_length=200)
    run: str = "default"
    task: str = ""
    problem_id: str = ""
    prompt: str = ""
    prompt_token_ids: list[int] = Field(min_length=1)
    completions: list[Completion] = Field(min_length=1)
    created_at: float = Field(default_factory=time.time)
    generation_s: float = 0.0
    scoring_s: float = 0.0

    @property
    def policy_version(self) -> int:
        return min(c.policy_version for c in self.completions)

    @property
    def rewards(self) -> list[float]:
        return [c.reward for c in self.completions]


class WeightsAnnouncement(WireModel):
    version: int = Field(ge=0)
    uri: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)
    created_at: float = Field(default_factory=time.time)
