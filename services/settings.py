"""Settings shared by every service: one pydantic-settings class per service composes these."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Base of every service's settings: env prefix per service, unknown keys are errors."""

    model_config = SettingsConfigDict(extra="forbid", env_nested_delimiter="__")

    run: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="run name (Redis namespace)")
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"), description="redis[s]://[:pw@]host:port/db"
    )
    admin_token: SecretStr | None = Field(None, description="bearer token for admin endpoints")
    log_level: str = "info"
