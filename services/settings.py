"""Settings shared by every service: one pydantic-settings class per service composes these.

Refused at start, with the offending key named (the CLI exits with code 2):
- unknown keys in `--config` JSON or keyword arguments (`extra="forbid"`);
- impossible values (each field's constraints);
- unknown environment variables with the service's own prefix, e.g. `R2VPO_LEARNER_GROUPS_PER_STP`:
  pydantic-settings ignores them by default, which turns a typo into a silently unused setting, so they are
  checked here (other `R2VPO_*` variables, such as `R2VPO_CACHE_DIR`, are not any service's prefix);
- a `redis_url` that is not `redis://`, `rediss://` (TLS) or `unix://`.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REDIS_SCHEMES = ("redis", "rediss", "unix")


def unknown_env_vars(prefix: str, fields: set[str], environ: dict[str, str] | None = None) -> list[str]:
    """Environment variables named `prefix…` whose first segment (before `__`) is not one of `fields`."""
    environ = os.environ if environ is None else environ
    prefix = prefix.upper()
    found = []
    for name in environ:
        if name.upper().startswith(prefix) and len(name) > len(prefix):
            field = name[len(prefix) :].lower().split("__", 1)[0]
            if field not in fields:
                found.append(name)
    return sorted(found)


class StrictSettings(BaseSettings):
    """Settings that refuse what they do not know: unknown keys and unknown `env_prefix…` variables are
    errors naming the key. The base of `ServiceSettings`, and of a service with no Redis (the reward
    service) that must not grow settings it would silently ignore."""

    # Errors name the key and the problem, never the value (a redis_url or token may be in it).
    model_config = SettingsConfigDict(extra="forbid", env_nested_delimiter="__", hide_input_in_errors=True)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_env_vars(cls, data: Any) -> Any:
        prefix = cls.model_config.get("env_prefix") or ""
        if prefix:
            unknown = unknown_env_vars(prefix, set(cls.model_fields))
            if unknown:
                raise ValueError(
                    f"unknown environment variable(s) {', '.join(unknown)}: no such {cls.__name__} field "
                    f"(fields: {', '.join(sorted(cls.model_fields))})"
                )
        return data


class ServiceSettings(StrictSettings):
    """Base of every Redis-attached service's settings: env prefix per service, unknown keys are errors."""

    run: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="run name (Redis namespace)")
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"), description="redis[s]://[:pw@]host:port/db or unix://path"
    )
    admin_token: SecretStr | None = Field(None, description="bearer token for admin endpoints")
    log_level: str = "info"

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in REDIS_SCHEMES:  # the URL itself is not echoed: it may hold a password
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, not {scheme!r}://")
        return value
