"""The reward plug-in SDK: turn `score(prompt, completion, metadata) -> float | Score` into a service.

    from client.plugin import Score, create_reward_app

    def score(prompt: str, completion: str, metadata: dict) -> float | Score:
        return float(completion.strip() == metadata["answer"])

    app = create_reward_app(score, reward_range=(0.0, 1.0))   # uvicorn module:app

The service speaks the contract of DESIGN §3 (`POST /score`, `POST /score_batch`, `GET /healthz`,
`GET /readyz`, `GET /metrics`). A failure is an HTTP error with an `ErrorResponse` body, never a reward
of 0: the function raised (500), returned a non-number / non-finite / out-of-range value (500), ran past
`timeout_s` (504), the body was malformed (422) or too large (413). `check_reward_service` tests any
service against this contract.

This module is the one import for plug-in authors and loads plug-ins by name (`load_plugin`); the parts
live in `client.scoring` (the function's contract, `RewardScorer`), `client.reward_app` (the service),
`client.reward_metrics` (its counters) and `client.reward_check` (the contract check).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from client.reward_app import create_reward_app
from client.reward_check import CheckResult, check_reward_main, check_reward_service
from client.scoring import RewardScorer, Score, ScoreFn, ScoreValue, ScoringError, as_score

__all__ = [
    "CheckResult",
    "PluginLoadError",
    "RewardScorer",
    "Score",
    "ScoreFn",
    "ScoreValue",
    "ScoringError",
    "as_score",
    "check_reward_main",
    "check_reward_service",
    "create_reward_app",
    "load_plugin",
]


class PluginLoadError(ValueError):
    """`load_plugin` could not turn a 'module:function' spec into a callable."""


def load_plugin(spec: str) -> Callable[..., Any]:
    """Import 'module:function' (or 'module:obj.attr') and return the callable, with a clear error."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PluginLoadError(f"plug-in must be given as 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise PluginLoadError(f"module {module_name!r} not found (installed? on PYTHONPATH?)") from exc
        raise PluginLoadError(
            f"module {module_name!r} failed to import: missing module {exc.name!r}"
        ) from exc
    except Exception as exc:
        raise PluginLoadError(
            f"module {module_name!r} failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginLoadError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginLoadError(f"{spec!r} is a {type(obj).__name__}, not a callable")
    return obj
