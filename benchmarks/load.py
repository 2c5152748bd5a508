"""Load test of the inference service and of the Redis trajectory queue: loopback only, bounded in count and
in time (issue "Reliability and security").

Inference: a real `r2vpo serve inference` process (torch engine, the embedded tiny policy) on 127.0.0.1,
driven by a *separate client process* (`load.py client …`) with C concurrent connections sending
OpenAI-style completion requests (a chain_sum prompt, n completions of max_tokens tokens each). Reported:
errors (any non-200 or transport error), p50/p90/p99/max latency, requests/s and generated tokens/s, and the
server's resident memory before, at peak and after (bounded memory: no growth with the number of requests).
It runs once with 1 client (unbatched latency) and once with C clients (the engine batches concurrent ones).

Queue: a real `redis-server` on 127.0.0.1 (append-only on, as `r2vpo up` runs it), P producer tasks pushing
bursts of B trajectory groups (G = 8 completions of 8 tokens, the default shape) as fast as admission lets
them (`wait_for_room` on a stream bound of M entries), and one learner-like consumer (read 16, "train" for a
fixed time, acknowledge). Reported: errors, push latency p50/p99, end-to-end latency (produced → acked)
p50/p99, the largest stream length sampled every 2 ms against the bound, Redis's peak `used_memory`, and
the accounting identity at the end. With P producers each checking for room before pushing, the stream can
pass the bound by at most P − 1 entries (check-then-push is not atomic); that is what is checked.

    python benchmarks/load.py                        # about a minute on 2 CPU cores
    python benchmarks/load.py --quick                # a smoke run, a few seconds of load
    python benchmarks/load.py --readme benchmarks/README.md   # also write the "Load" section there

Results go to `--out` (default benchmarks/results/load/results.json). Exit code 1 if any check fails.
"""

# The code lives in the `loadtest` package beside this file, a module per job (its __init__ lists them).

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/load.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.loadtest import cli  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
