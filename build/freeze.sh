#!/usr/bin/env bash
# Build the `outpost` executable with PyInstaller (build/outpost.spec).
#
#   build/freeze.sh              one folder: dist/outpost/outpost (fast start; the default)
#   build/freeze.sh --onefile    one file:   dist/outpost-onefile (unpacks itself each start)
#   build/freeze.sh --clean      drop PyInstaller's cache first
#
# The Python that builds is $PYTHON, else .venv/bin/python, else python3; it needs the
# project and its `build` extra installed (pip install -e '.[build]'). Build on the target
# architecture: x86_64 here; aarch64 on a Jetson, where JetPack's TensorRT and CUDA Python
# bindings are frozen in when that Python can import them (see docs/operations.md).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

onefile=0
clean=()
for arg in "$@"; do
    case "$arg" in
        --onefile) onefile=1 ;;
        --clean) clean=(--clean) ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "freeze.sh: unknown option '$arg' (use --onefile, --clean)" >&2; exit 2 ;;
    esac
done

if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi

if ! "$py" -c 'import PyInstaller' 2>/dev/null; then
    echo "freeze.sh: PyInstaller is not installed for $py; install the build extra:" >&2
    echo "    $py -m pip install -e '.[build]'" >&2
    exit 2
fi
if ! missing=$(PYTHONPATH="$ROOT" "$py" - <<'EOF'
import importlib.util, sys
need = ["numpy", "onnx", "onnxruntime", "msgpack", "sqlite_utils", "tomli_w"]
gone = [n for n in need if importlib.util.find_spec(n) is None]
print(" ".join(gone))
sys.exit(1 if gone else 0)
EOF
); then
    echo "freeze.sh: $py lacks outpost's dependencies ($missing); install them:" >&2
    echo "    $py -m pip install -e '.[build]'" >&2
    exit 2
fi

arch=$(uname -m)
accel=$("$py" - <<'EOF'
import importlib.util
found = []
for name in ("tensorrt", "pycuda", "cuda.bindings", "cuda.cudart"):
    try:
        if importlib.util.find_spec(name) is not None:
            found.append(name)
    except Exception:  # a missing parent package, or bindings that fail to load
        pass
print(" ".join(found))
EOF
)
echo "freeze.sh: building on $arch with $("$py" -c 'import sys; print(sys.version.split()[0])')" \
     "($py); accelerators: ${accel:-none (ONNX Runtime on the CPU only)}"
if [[ -f /etc/nv_tegra_release ]]; then
    echo "freeze.sh: Jetson: $(head -n1 /etc/nv_tegra_release)"
fi
if [[ "$accel" != *tensorrt* ]] && [[ -x /usr/bin/python3 ]] \
        && /usr/bin/python3 -c 'import tensorrt' 2>/dev/null; then
    # JetPack installs TensorRT's Python module for the system Python only.
    sys_ver=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    our_ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    echo "freeze.sh: note: /usr/bin/python3 ($sys_ver) has TensorRT but $py ($our_ver) does" \
         "not, so this build will serve with ONNX Runtime only." >&2
    if [[ "$sys_ver" == "$our_ver" ]]; then
        echo "freeze.sh: make the venv with '/usr/bin/python3 -m venv --system-site-packages" \
             ".venv' to freeze TensorRT in." >&2
    else
        echo "freeze.sh: build TensorRT's Python bindings for Python $our_ver first" \
             "(docs/operations.md, 'Jetson')." >&2
    fi
fi

spec_args=()
[[ $onefile == 1 ]] && spec_args=(--onefile)

start=$(date +%s)
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$py" -m PyInstaller --noconfirm ${clean[@]+"${clean[@]}"} \
    --log-level WARN --workpath build/work --distpath dist build/outpost.spec -- ${spec_args[@]+"${spec_args[@]}"}
took=$(( $(date +%s) - start ))

if [[ $onefile == 1 ]]; then
    exe=dist/outpost-onefile
    size=$(du -sh "$exe" | cut -f1)
else
    exe=dist/outpost/outpost
    size=$(du -sh dist/outpost | cut -f1)
    {
        echo "outpost $("$exe" --version | cut -d' ' -f2)"
        echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $arch ($(uname -r))"
        echo "python $("$py" -c 'import sys; print(sys.version.split()[0])')"
        echo "accelerators ${accel:-none}"
        echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    } > dist/outpost/BUILD-INFO.txt
    # What the hooks in build/hooks/ are for: fail here rather than slow or broken later.
    for want in "msgpack/_cmsgpack*.so" "onnxruntime/capi/libonnxruntime_providers_shared.so"; do
        compgen -G "dist/outpost/_internal/$want" >/dev/null \
            || { echo "freeze.sh: the build lacks $want (see build/hooks/)" >&2; exit 1; }
    done
    if [[ "$accel" == *tensorrt* ]] && ! compgen -G "dist/outpost/_internal/libnvinfer*.so*" >/dev/null; then
        echo "freeze.sh: tensorrt is importable but no libnvinfer was collected" \
             "(build/hooks/hook-tensorrt.py; set TENSORRT_LIB_DIR)" >&2
        exit 1
    fi
fi
"$exe" --version >/dev/null   # it starts at all
echo "freeze.sh: built $exe ($size) in ${took} s"
