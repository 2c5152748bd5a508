"""Settings of the inference service (env prefix `R2VPO_INFERENCE_`)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field

from services.settings import ServiceSettings


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); False for anything else."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class InferenceSettings(ServiceSettings, env_prefix="R2VPO_INFERENCE_"):
    """How the inference service runs: model, engine, limits, weight following and admin access."""

    port: int = Field(8001, ge=0, le=65535)
    model: Path | None = Field(None, description="HF causal-LM directory [default: the embedded tiny policy]")
    engine: Literal["torch", "vllm"] = "torch"
    device: str = "cpu"
    served_model_name: str | None = Field(None, description="model id in the API [default: directory name]")
    watch_weights: bool = Field(True, description="follow weight announcements on Redis")
    weights_poll_s: float = Field(1.0, gt=0, description="re-read the announcement hash at least this often")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="larger request bodies get 413, unparsed")
    max_prompt_tokens: int = Field(512, ge=1)
    max_n: int = Field(64, ge=1)
    max_tokens_limit: int = Field(256, ge=1)
    max_batch_size: int = Field(512, ge=1, description="sequences sampled together in one batch")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads [default: torch's]; set it when services share cores"
    )
    local_only: bool = Field(False, description="allow admin endpoints without a token on a loopback host")

    def admin_open(self) -> bool:
        """True when admin endpoints need no token (local_only on a loopback host, no token set)."""
        return self.admin_token is None and self.local_only and is_loopback(self.host)

    def check_admin(self) -> None:
        """Refuse to run admin endpoints unprotected: ValueError unless a token is set or admin_open()."""
        if self.admin_token is None and not self.admin_open():
            where = (
                f"host {self.host!r} is not a loopback address" if self.local_only else "local_only is off"
            )
            raise ValueError(
                f"the inference service needs an admin token (R2VPO_INFERENCE_ADMIN_TOKEN) for "
                f"/admin/load_weights: {where}; set admin_token, or local_only=true with a loopback host"
            )
