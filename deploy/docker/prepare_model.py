#!/usr/bin/env python
"""Put the policy model in place before the services start; print its directory.

    r2vpo-prepare-model [MODEL]

MODEL (else `$R2VPO_MODEL`):
- empty or `default`: build (or reuse) the embedded tiny policy in `$R2VPO_CACHE_DIR` — the warm start takes
  minutes on a few CPU cores, so compose and Kubernetes run this once into a cache volume instead of letting
  the inference service and the learner each build it at their first start;
- anything else: the name of a Hugging Face-format model directory (holding `config.json`) that the user
  has put under `$R2VPO_MODELS_DIR` (default `/models`, mounted read-only from the host or a volume). It is
  only checked, never fetched: r2vpo never downloads models. Exits 1 with what to do when it is missing.
  The services load that directory (`R2VPO_INFERENCE_MODEL`, `R2VPO_LEARNER_MODEL`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path, PurePosixPath

PROG = "r2vpo-prepare-model"


class ModelNotFound(Exception):
    """The model directory is not where the services will look for it (the message says what to do)."""


def model_directory(model: str, models_dir: Path) -> Path:
    """`models_dir/model`, after refusing names that would point outside `models_dir`."""
    name = PurePosixPath(model)
    if not name.parts or name.is_absolute() or "\\" in model or ".." in name.parts or model.startswith("~"):
        raise ModelNotFound(
            f"R2VPO_MODEL={model!r}: give the name of a directory under {models_dir} "
            "(relative, without '..'), not a path"
        )
    return models_dir.joinpath(*name.parts)


def prepare(model: str, models_dir: Path) -> Path:
    if model in ("", "default"):
        from trainer.tiny import ensure_default_policy

        return ensure_default_policy(progress=False)
    target = model_directory(model, models_dir)
    if not (target / "config.json").is_file():
        found = "it exists but holds no config.json" if target.is_dir() else "it does not exist"
        raise ModelNotFound(
            f"no model at {target} ({found}). Put the model directory at {target}: a Hugging Face-format "
            f"model (config.json, tokenizer files, *.safetensors) copied or exported there by you; "
            "r2vpo never downloads models. See docs/deploy.md, 'Choosing a model'."
        )
    return target


def main(argv: list[str]) -> int:
    model = argv[1] if len(argv) > 1 else os.environ.get("R2VPO_MODEL", "")
    models_dir = Path(os.environ.get("R2VPO_MODELS_DIR", "/models"))
    try:
        path = prepare(model.strip(), models_dir)
    except ModelNotFound as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return 1
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
