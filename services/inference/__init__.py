"""The inference service: OpenAI-compatible completions with log-probs and policy versions (DESIGN §6)."""

from services.inference.app import create_app
from services.inference.settings import InferenceSettings

__all__ = ["InferenceSettings", "create_app"]
