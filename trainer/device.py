"""Where the learner trains: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when torch sees a GPU, else CPU).

The spelling is checked when a config is validated (``check_device_spec``); whether the device exists is
checked once at start (``resolve_device``), so a config written for a GPU host still validates elsewhere
(the deploy checks parse the GPU profile's settings on a CPU machine) and a learner without the GPU it asks
for stops with a message naming the setting instead of failing deep inside torch at its first tensor.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

DEVICE_SPEC = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
DEVICE_CHOICES = "'cpu', 'cuda', 'cuda:N' or 'auto'"


class DeviceUnavailable(ValueError):
    """The configured device does not exist on this machine."""


def check_device_spec(spec: str) -> str:
    """``spec`` normalised (stripped, lower-case); ValueError naming the choices for anything else."""
    value = spec.strip().lower()
    if not DEVICE_SPEC.match(value):
        raise ValueError(f"device must be {DEVICE_CHOICES} (auto: cuda if available, else cpu), got {spec!r}")
    return value


def resolve_device(spec: str, *, setting: str = "learner.device") -> torch.device:
    """The torch device ``spec`` names on this machine; ``auto`` picks CUDA when available.

    DeviceUnavailable when CUDA is asked for and torch cannot use it, or the index is out of range."""
    value = check_device_spec(spec)
    if value == "cpu" or (value == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) is built without CUDA"
        else:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = "torch sees no CUDA device" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible else "")
        raise DeviceUnavailable(f"{setting} is {spec!r} but {why}; set it to 'cpu' or 'auto'")
    index = torch.cuda.current_device() if value in ("auto", "cuda") else int(value.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailable(
            f"{setting} is {spec!r} but torch sees {count} CUDA device(s) (cuda:0 … cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def to_cpu(value: Any) -> Any:
    """``value`` (a tensor, or dicts / lists / tuples of them, e.g. a state dict) with every tensor detached
    on the CPU, so what is saved loads on any machine. Tensors that are views of the same memory in the same
    shape (tied weights) stay one tensor, as they were; CPU tensors are returned as they are (no copy)."""
    seen: dict[tuple, torch.Tensor] = {}

    def move(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            key = (item.device, item.data_ptr(), item.dtype, tuple(item.shape), item.stride())
            if key not in seen:
                seen[key] = item.detach().cpu()
            return seen[key]
        if isinstance(item, dict):
            return {k: move(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return type(item)(move(v) for v in item)
        return item

    return move(value)
