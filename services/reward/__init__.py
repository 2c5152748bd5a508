"""The reward service (DESIGN §1, §3): built-in scorers and user plug-ins behind one HTTP contract.

Exports are loaded lazily, so the math_verify worker process (which imports
`services.reward.mathcheck`) starts without importing FastAPI or reasoning-gym.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.reward.app import create_app, main
    from services.reward.settings import RewardSettings

__all__ = ["RewardSettings", "create_app", "main"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "main"):
        from services.reward import app

        return getattr(app, name)
    if name == "RewardSettings":
        from services.reward.settings import RewardSettings

        return RewardSettings
    raise AttributeError(f"module 'services.reward' has no attribute {name!r}")
