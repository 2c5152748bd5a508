"""tests/vllm runs only inside the vLLM venv (`.ci/vllm-tests.sh`); collected without vLLM it fails loudly.

The main test run leaves this folder out (`--ignore=tests/vllm`); a silent skip here would let CI count
the vLLM engine as tested when it never ran.
"""

from __future__ import annotations

import os
import tempfile

import pytest

try:  # `from`: under pytest, tests/ is on sys.path and makes this very folder a namespace package `vllm`
    from vllm import LLM  # noqa: F401
except ImportError as exc:
    raise pytest.UsageError(
        f"tests/vllm needs vLLM ({exc}). Build its venv with .ci/vllm-env.sh and run "
        ".venv-vllm/bin/python -m pytest tests/vllm (or .ci/vllm-tests.sh); the main run ignores this "
        "folder with --ignore=tests/vllm"
    ) from exc

# vLLM's caches and the socket / process-group files it leaves in the temp dir go to a scratch folder.
_SCRATCH = tempfile.mkdtemp(prefix="r2vpo-vllm-")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(_SCRATCH, "cache"))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
tempfile.tempdir = _SCRATCH


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    shutil.rmtree(_SCRATCH, ignore_errors=True)
