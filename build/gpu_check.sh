#!/usr/bin/env bash
# Check outpost's CUDA module and TensorRT engine on an NVIDIA host, with no network.
#
# usage: build/gpu_check.sh [--python PY] [--wheels DIR] [CHECK OPTIONS]
#   --python PY    the Python to run (default: $PYTHON, else python3); JetPack's TensorRT
#                  lives in the system python3
#   --wheels DIR   first install a CUDA binding offline from DIR (no index is contacted):
#                  a pycuda sdist (builds here: needs the CUDA toolkit's nvcc and headers)
#                  or a cuda-bindings wheel carried from a machine with network
#   CHECK OPTIONS  passed to build/gpu_check.py: --binding auto|pycuda|cuda.bindings,
#                  --device N, --batch N, --skip-tensorrt, --require-gpu, --keep DIR
# It prints RAN / SKIP (with why) / FAIL for each step; exit 0 when nothing failed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-python3}"
wheels=""
pass=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --python needs a value" >&2; exit 2; }
                  py="$2"; shift 2 ;;
        --wheels) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --wheels needs a folder" >&2; exit 2; }
                  wheels="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) pass+=("$1"); shift ;;
    esac
done

if ! command -v "$py" >/dev/null 2>&1; then
    echo "gpu_check.sh: no Python at '$py'; pass --python PATH" >&2
    exit 2
fi

if [[ -n "$wheels" ]]; then
    if [[ ! -d "$wheels" ]]; then
        echo "gpu_check.sh: --wheels $wheels is not a folder" >&2
        exit 2
    fi
    if ls "$wheels"/pycuda-* >/dev/null 2>&1; then
        if ! command -v nvcc >/dev/null 2>&1 && [[ -z "${CUDA_HOME:-}" ]] \
                && [[ ! -d /usr/local/cuda ]]; then
            echo "gpu_check.sh: note: no nvcc, CUDA_HOME or /usr/local/cuda: a pycuda sdist" \
                 "needs the CUDA toolkit to build" >&2
        fi
        export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
        "$py" -m pip install --no-index --find-links "$wheels" pycuda \
            || echo "gpu_check.sh: pycuda did not install from $wheels (see above)" >&2
    fi
    if ls "$wheels"/cuda_bindings-* "$wheels"/cuda_python-* >/dev/null 2>&1; then
        "$py" -m pip install --no-index --find-links "$wheels" cuda-bindings \
            || echo "gpu_check.sh: cuda-bindings did not install from $wheels" >&2
    fi
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$here/gpu_check.py" "${pass[@]+"${pass[@]}"}"
