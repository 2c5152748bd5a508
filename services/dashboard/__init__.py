"""The live training dashboard: a FastAPI app over run directories (and optionally Redis)."""

from services.dashboard.app import create_app
from services.dashboard.settings import DashboardSettings

__all__ = ["DashboardSettings", "create_app"]
