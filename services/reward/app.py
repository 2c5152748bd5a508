"""The reward service: the SDK's `create_reward_app` over a built-in scorer or a user plug-in, so both
share one contract (and the same `/metrics`)."""

from __future__ import annotations

from fastapi import FastAPI

from client.plugin import ScoreFn, create_reward_app, load_plugin
from services.reward.builtins import builtin_scorer
from services.reward.settings import RewardSettings


def resolve_scorer(settings: RewardSettings) -> tuple[ScoreFn, str]:
    """The scoring function `settings.plugin` names, and the service name to report."""
    if settings.plugin.startswith("builtin:"):
        name = settings.plugin.removeprefix("builtin:")
        fn = builtin_scorer(
            name,
            dataset=settings.dataset,
            dataset_params=settings.dataset_params,
            partial_credit=settings.partial_credit,
            timeout_s=settings.timeout_s,
        )
        return fn, f"{name}:{settings.dataset}" if name == "reasoning_gym" else name
    return load_plugin(settings.plugin), settings.plugin


def create_app(settings: RewardSettings | None = None) -> FastAPI:
    """The reward service app for `settings` (defaults: built-in reasoning-gym chain_sum scorer)."""
    settings = settings or RewardSettings()
    fn, name = resolve_scorer(settings)
    app = create_reward_app(
        fn, name=name, reward_range=settings.effective_reward_range, timeout_s=settings.timeout_s
    )
    app.state.settings = settings
    return app


def main(settings: RewardSettings | None = None) -> None:
    """Serve the reward service under uvicorn (blocks until stopped)."""
    import uvicorn

    settings = settings or RewardSettings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
