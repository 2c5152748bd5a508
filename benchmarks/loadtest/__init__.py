"""The load test behind `python benchmarks/load.py` (its docstring says what it loads and reports):

latency.py    nearest-rank percentiles and the latency summary in milliseconds
client.py     the client process: concurrent completion requests to a loopback inference server
inference.py  the inference phase: a served tiny policy, the client runs against it, its resident memory
queue.py      the queue phase: bursty producers and a learner-like consumer on a real redis-server
report.py     the checks, the machine facts, the markdown section and its place in a README
cli.py        the flags and the driver
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "load.py"  # the command; the client process runs it again (`load.py client`)
