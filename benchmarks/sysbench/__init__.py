"""The system benchmark behind `python benchmarks/system.py` (its docstring says what it measures).

config: paths, sections, sizes per mode, the log line · measure: medians, figures, paired ratios ·
machine: the machine facts of a run · models: the tiny and the large policy · monitors: the RSS/CPU
sampler and the served-version poller · context: what every section gets · e2e, queue, weights, engine,
learner, memory: one module per section, each with its `bench_<section>` · runner: runs the sections
into one results dict · report: the markdown table and the README section · cli: the command line.
"""
