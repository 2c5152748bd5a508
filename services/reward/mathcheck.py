"""math_verify under a hard time limit.

math_verify's own timeouts use SIGALRM, which works only on a process's main thread, and a reward
service runs scoring functions on worker threads, where nothing can stop a runaway sympy call. So
parse + verify run in a worker process (`python -m services.reward.mathcheck`, JSON lines over its
stdin/stdout) that is killed and restarted when a call runs past
`timeout_s`. Nothing is `eval`ed (math_verify parses) and nothing is unpickled. POSIX only (select).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding the `services` package


def _serve() -> None:
    """Worker main loop: one JSON line in (`[gold, answer]`), one JSON line out."""
    out, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the protocol
    import logging

    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):  # "timeout disabled": we kill instead
        logging.getLogger(name).setLevel(logging.ERROR)

    def reply(obj: object) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply({"ready": True})
    for line in sys.stdin:
        gold, answer = json.loads(line)
        try:
            # No in-process time limits: math_verify would turn a timeout into "not equal" (a silent 0);
            # the parent kills this process instead, which the caller sees as an error.
            gold_parsed = math_verify.parse(gold, parsing_timeout=None)
            answer_parsed = math_verify.parse(answer, parsing_timeout=None)
            if not gold_parsed:
                raise ValueError(f"could not parse the reference answer {gold!r}")
            equal = bool(answer_parsed) and bool(
                math_verify.verify(gold_parsed, answer_parsed, timeout_seconds=None)
            )
            reply({"ok": [equal, [str(x) for x in gold_parsed], [str(x) for x in answer_parsed]]})
        except Exception as exc:  # reported to the caller, who raises it
            reply({"error": f"{type(exc).__name__}: {exc}"})


class MathChecker:
    """`equivalent(gold, answer)` in a killable worker process; thread-safe (calls are serialised)."""

    def __init__(self, timeout_s: float = 5.0, *, startup_timeout_s: float = 60.0) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = bytearray()

    def _readline(self, timeout_s: float) -> dict | None:
        """The worker's next JSON line, or None when it did not come in time (or the worker died)."""
        assert self._proc is not None and self._proc.stdout is not None
        fd, deadline = self._proc.stdout.fileno(), time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return json.loads(line)

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._stop()
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "services.reward.mathcheck"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        if self._readline(self.startup_timeout_s) is None:
            self._stop()
            raise TimeoutError(f"math_verify worker did not start within {self.startup_timeout_s}s")
        return self._proc

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=5)
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    pipe.close()
        self._proc, self._buffer = None, bytearray()

    def equivalent(self, gold: str, answer: str) -> tuple[bool, list[str], list[str]]:
        """Whether `answer` is mathematically equal to `gold`, with both as parsed.
        Raises TimeoutError past `timeout_s`, ValueError when the reference does not parse."""
        with self._lock:
            proc = self._ensure()
            assert proc.stdin is not None
            try:
                proc.stdin.write(json.dumps([gold, answer]).encode() + b"\n")
                proc.stdin.flush()
            except OSError:
                self._stop()
                raise RuntimeError("math_verify worker died") from None
            result = self._readline(self.timeout_s)
            if result is None:
                died = proc.poll() is not None
                self._stop()
                raise (
                    RuntimeError("math_verify worker died")
                    if died
                    else TimeoutError(f"math_verify took longer than {self.timeout_s}s")
                )
        if "error" in result:
            raise ValueError(f"math_verify failed: {result['error']}")
        equal, gold_parsed, answer_parsed = result["ok"]
        return equal, gold_parsed, answer_parsed

    def close(self) -> None:
        """Stop the worker (a later call starts a new one)."""
        with self._lock:
            self._stop()


if __name__ == "__main__":
    _serve()
