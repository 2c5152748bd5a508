"""What every section gets: the parsed arguments, mode and sizes, device, scratch directory, models."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .config import SIZES
from .models import Models
from .monitors import ProcSampler


class Context:
    def __init__(self, args: argparse.Namespace, scratch: Path, machine: dict[str, Any]) -> None:
        self.args = args
        self.mode = "quick" if args.quick else "full"
        self.sizes = SIZES[self.mode]
        self.device = args.device
        self.scratch = scratch
        self.machine = machine
        self.models = Models(scratch, args.device, args.model)
        self.memory_samples: dict[str, ProcSampler] = {}
