"""System benchmark: the system's speed against its floors (issue "Benchmarks … the system's speed").

Every figure is a value, the baseline or floor it is judged against, and their ratio, measured in the same
run, side by side: repetitions are interleaved (the order rotates every repetition), `value` and `baseline`
are medians and `ratio` is the median of the per-repetition ratios (each value over the baseline measured
next to it), with a 95% bootstrap interval when there are at least three repetitions. Timings on a shared
machine are noisy; ratios measured side by side are not (much). The load average is recorded per section.

    section  value                                              baseline / floor
    e2e      rollouts/s the learner consumes, `r2vpo up         `r2vpo up --mode sync` (lock-step), and the
             --mode async` (from its metrics: start-up and the  in-process sync trainer (`run_sync`), same
             first max_lag + 1 = 5 steps excluded)              settings, same measurement
    queue    groups/s through TrajectoryQueue push+read+ack     raw pipelined XADD / XREADGROUP / XACK of the
             (G=8 completions of ~10 tokens, JSON)              same bytes on the same redis-server
    weights  learner step end → /v1/models serves the version   writing (+fsync) and reading the same bytes
             (publish → announce → watcher fetch, verify, swap)  (memcpy, disk write and read bandwidth too)
    engine   tokens/s of TorchEngine (and VllmEngine, in        transformers `generate` (KV cache, sampling,
             .venv-vllm) on one batch                           same model, batch, max_new_tokens)
    learner  tokens/s of Learner.train_on with R²VPO at λ = 0,  the same step with GRPO (clipping), paired
             at λ = 1, and at λ = 1 with one backward pass
    memory   peak RSS of each `r2vpo up` service                a bare python that imported what it needs
                                                                (torch + transformers, or the web stack);
                                                                redis: an empty redis-server

    python benchmarks/system.py --quick                  # smoke test: every section at its smallest
    python benchmarks/system.py --full                   # results/system/<date>.json + README table
    python benchmarks/system.py --full --only queue learner
    python benchmarks/system.py --full --device cuda     # on a GPU machine: Qwen2-0.5B-shaped model
    python benchmarks/system.py --report RESULTS_JSON    # print the markdown of a results file

CPU runs pin this process to one torch thread, as `r2vpo up` pins its services (torch_threads=1), so the
in-process sync trainer and the engine/learner comparisons run under the same setting as the services.
`--device cuda` runs the inference service, the engines and the learner comparison on the GPU with a
randomly initialised model of the Qwen2-0.5B shape; the learner *service* and `run_sync` have no device
setting yet and stay on the CPU. Without CUDA it refuses with exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/system.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.sysbench import cli  # noqa: E402
from benchmarks.sysbench.measure import figure  # noqa: E402
from benchmarks.sysbench.report import update_readme  # noqa: E402

__all__ = ["figure", "main", "update_readme"]  # what tests/e2e/test_system_benchmark_smoke.py uses


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
