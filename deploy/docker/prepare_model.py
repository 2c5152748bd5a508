#!/usr/bin/env python
"""Put the policy model in place before the services start; print its directory.

    r2vpo-prepare-model [MODEL]

MODEL (else `$R2VPO_MODEL`):
- empty or `default`: build (or reuse) the embedded tiny policy in `$R2VPO_CACHE_DIR` — the warm start takes
  minutes on a few CPU cores, so compose and Kubernetes run this once into a cache volume instead of letting
  the inference service and the learner each build it at their first start;
- the name of a directory under `$R2VPO_MODELS_DIR` holding `config.json`: used as it is;
- a Hugging Face hub id (`Qwen/Qwen2.5-0.5B-Instruct`): downloaded to `$R2VPO_MODELS_DIR/<id>` (default
  `/models/<id>`) unless already there; `HF_TOKEN` is read for gated models. The services load that
  directory (`R2VPO_INFERENCE_MODEL`, `R2VPO_LEARNER_MODEL`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def prepare(model: str, models_dir: Path) -> Path:
    if model in ("", "default"):
        from trainer.tiny import ensure_default_policy

        return ensure_default_policy(progress=False)
    if Path(model).is_absolute():  # the services load $R2VPO_MODELS_DIR/<model>: keep it relative
        raise SystemExit(f"r2vpo-prepare-model: give a hub id or a directory under {models_dir}, not {model}")
    target = models_dir / model
    if (target / "config.json").is_file():
        return target
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=model, local_dir=target)
    return target


def main(argv: list[str]) -> int:
    model = argv[1] if len(argv) > 1 else os.environ.get("R2VPO_MODEL", "")
    models_dir = Path(os.environ.get("R2VPO_MODELS_DIR", "/models"))
    print(prepare(model.strip(), models_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
