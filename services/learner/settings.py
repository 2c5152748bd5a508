"""Settings of the learner service (env prefix `R2VPO_LEARNER_`; nested keys with `__`, e.g.
`R2VPO_LEARNER_LEARNER__ALGO=grpo`, `R2VPO_LEARNER_LEARNER__DEVICE=cuda`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from services.settings import ServiceSettings
from trainer.learner import LearnerConfig
from trainer.task import TaskConfig


class LearnerSettings(ServiceSettings, env_prefix="R2VPO_LEARNER_"):
    port: int = 8004
    model: Path | None = Field(None, description="initial HF model directory; None = embedded tiny policy")
    run_dir: Path = Path("runs/async")
    weights_dir: Path | None = Field(None, description="weight store; default <run_dir>/weights")
    weights_base_url: str | None = Field(None, description="serve weights over HTTP at this base URL")
    # learner.device (cpu | cuda | cuda:N | auto) is checked for spelling here and for existence at start
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    groups_per_step: int = Field(16, ge=1)
    commit_every: int = Field(1, ge=1, description="checkpoint + publish + ack every N steps")
    max_steps: int | None = Field(None, ge=1, description="stop after this many learner steps")
    eval_every: int = Field(25, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    read_block_ms: int = Field(500, ge=1)
    reclaim_idle_ms: int = Field(30_000, ge=100, description="take over pending groups idle this long")
    consumer: str = "learner-0"
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; None = torch default")
    redis_retries: int = Field(
        30, ge=1, description="attempts per Redis operation (backoff 0.2 s doubling to 2 s) before giving up"
    )
    max_consecutive_nonfinite: int = Field(
        5, ge=1, description="stop (exit non-zero) after this many batches in a row with a non-finite update"
    )
    seed: int = 0

    @field_validator("learner")
    @classmethod
    def _known_algo(cls, value: LearnerConfig) -> LearnerConfig:
        from trainer.losses import get_loss

        get_loss(value.algo)  # ValueError naming the choices
        return value

    def initial_model(self) -> Path:
        """The model a learner without a checkpoint starts from (the embedded tiny policy by default)."""
        if self.model is not None:
            return self.model
        from trainer.tiny import ensure_default_policy

        return ensure_default_policy(task_cfg=self.task, progress=False)
