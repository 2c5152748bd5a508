"""Checkpoints: model (safetensors), optimizer, dual state, counters and RNG state; resume continues a run.

Layout of one checkpoint directory (written to a temporary sibling, then renamed, so a crash never leaves a
half checkpoint that looks complete):

    model/              save_pretrained (safetensors) of model + tokenizer
    optimizer.pt        torch.save of optimizer.state_dict() — loaded with weights_only=True
    rng.pt              torch CPU RNG state — loaded with weights_only=True
    trainer_state.json  version, step, dual state, counters, python RNG state

Everything is written from CPU tensors (a learner on a GPU included) and read onto the CPU first, so a
checkpoint resumes on any device: the optimizer moves its state to its parameters' device as it loads.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer.device import to_cpu

LATEST = "latest"


def save_checkpoint(
    root: Path,
    *,
    policy: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rng: random.Random,
) -> Path:
    """Write checkpoint `step-<version>` under root and point `latest` at it. Returns its directory."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(state['version']):08d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    policy.save(tmp / "model")
    torch.save(to_cpu(optimizer.state_dict()), tmp / "optimizer.pt")
    torch.save(torch.get_rng_state(), tmp / "rng.pt")
    payload = dict(state, python_rng=_encode_rng(rng.getstate()))
    (tmp / "trainer_state.json").write_text(json.dumps(payload, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name)
    pointer.replace(root / LATEST)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer, rng: random.Random) -> dict[str, Any]:
    """Restore optimizer and RNG state in place; returns the saved counters (version, step, dual, ...)."""
    state = json.loads((path / "trainer_state.json").read_text())
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True, map_location="cpu"))
    rng.setstate(_decode_rng(state.pop("python_rng")))
    return state


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (by name) and delete the rest."""
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _encode_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_rng(data: list) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
