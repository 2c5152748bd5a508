"""A user reward plug-in (`module:function`) that fails for some prompts, for the fault tests.

    r2vpo serve reward --plugin fault_plugins:flaky      (with this folder on PYTHONPATH)

Each prompt gets a behaviour the first time it is seen, in turn from `CYCLE`, and keeps it: it hangs past the
service's time limit, raises (HTTP 500), returns NaN or inf, returns a reward outside the declared range
[0, 1], or scores correctly. No three failing prompts follow each other, so only an outage opens the
circuit breaker: while the file named by `FLAKY_OUTAGE_FILE` exists every call raises.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

CYCLE = (
    "hang",
    "ok",
    "ok",
    "raise",
    "ok",
    "ok",
    "nan",
    "ok",
    "ok",
    "inf",
    "ok",
    "ok",
    "range",
    "ok",
    "ok",
    "ok",
)
HANG_S = 1.5
_lock = threading.Lock()
_kinds: dict[str, str] = {}


def kind_of(prompt: str) -> str:
    with _lock:
        if prompt not in _kinds:
            _kinds[prompt] = CYCLE[len(_kinds) % len(CYCLE)]
        return _kinds[prompt]


def flaky(prompt: str, completion: str, metadata: dict[str, Any]) -> float:
    outage = os.environ.get("FLAKY_OUTAGE_FILE")
    if outage and os.path.exists(outage):
        raise ConnectionError("reward back end unavailable (outage)")
    kind = kind_of(prompt)
    if kind == "hang":
        time.sleep(HANG_S)
    elif kind == "raise":
        raise RuntimeError(f"cannot score prompt {prompt!r}")
    elif kind == "nan":
        return float("nan")
    elif kind == "inf":
        return float("inf")
    elif kind == "range":
        return 5.0
    return 1.0 if completion.strip() == str(metadata["answer"]).strip() else 0.0
