#!/usr/bin/env bash
# Smoke-test a release tarball where its users are: unpacked into a fresh Debian bullseye
# root (debootstrap's minbase: glibc 2.31 and nothing a build added), its checksum checked
# first, then build/smoke_test.sh run inside against the executable, then `outpost install
# --from` the tarball (a tampered copy must be refused) and the device's site-packages
# folder (build/entry.py) looked up. An aarch64 release runs under qemu-user.
#
#   build/release_smoke.sh dist/outpost-VERSION-linux-ARCH.tar.gz
#
# Under qemu-user, measuring each model's layout (threads, instances, batch) at a server's
# start takes minutes (440 s for the demo's three on 2 cores, past the smoke test's 60 s
# wait), so the aarch64 smoke test runs with a config that fixes the layout
# ($OUTPOST_CONFIG, below); every other step is the same. The whole test, layout measured,
# runs on an aarch64 machine itself: tar xzf the release there, then
# `build/smoke_test.sh outpost-VERSION-linux-aarch64/outpost`.
# Same host needs as build/release.sh; the bullseye root is its cached base root, copied.
set -euo pipefail
{  # read whole before it runs: editing this file can't change a running test
ME=release_smoke.sh
REPO="$(cd "$(dirname "$0")/.." && pwd)"
source "$REPO/build/release_lib.sh"

tarball=""
for arg in "$@"; do
    case "$arg" in
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
                   exit 0 ;;
        -*) echo "$ME: unknown option '$arg'" >&2; exit 2 ;;
        *) [[ -z "$tarball" ]] || { echo "$ME: one release at a time" >&2; exit 2; }
           tarball=$arg ;;
    esac
done
[[ -n "$tarball" ]] || { echo "$ME: which release? $ME dist/outpost-VERSION-linux-ARCH.tar.gz" >&2; exit 2; }
[[ -f "$tarball" ]] || { echo "$ME: $tarball: no such file" >&2; exit 2; }
base=$(basename "$tarball")
[[ "$base" =~ ^(outpost-.+-linux-(x86_64|aarch64))\.tar\.gz$ ]] \
    || { echo "$ME: $base is not named outpost-VERSION-linux-ARCH.tar.gz" >&2; exit 2; }
name=${BASH_REMATCH[1]} arch=${BASH_REMATCH[2]}
[[ -f "$tarball.sha256" ]] || die "no $tarball.sha256 beside it: a release is checked before it is run"
(cd "$(dirname "$tarball")" && sha256sum --quiet -c "$base.sha256") >/dev/null 2>&1 \
    || die "$tarball does not match its $base.sha256: a damaged or altered download; fetch both again"

check_host "$arch"
mkdir -p "$CACHE"
if [[ ! -d "$(root_dir "$arch" base)" ]]; then
    check_mirror
    ensure_base_root "$arch"
fi

start=$(date +%s)
smoke_root="$CACHE/.smoke-$arch-$$"
trap 'remove_tree "$smoke_root"' EXIT
say "a fresh $SUITE root for $name"
cp -a "$(root_dir "$arch" base)" "$smoke_root"
tar -C "$smoke_root/opt" -xzf "$tarball"
mkdir -p "$smoke_root/opt/smoke"
cp "$REPO/build/smoke_test.sh" "$smoke_root/opt/smoke/"
cpuinfo=() config=()
if [[ "$arch" == aarch64 ]]; then
    arm_cpuinfo "$smoke_root/opt/smoke/cpuinfo"
    cpuinfo=(--cpuinfo "$smoke_root/opt/smoke/cpuinfo")
    printf '%s\n' "# the layout fixed: measuring it under qemu-user takes minutes" \
        "[threads]" "intra_op = 1" "spinning = false" \
        "[batching]" "instances = 1" "auto_preferred_batch = false" \
        "[warmup]" "budget_ms = 0" > "$smoke_root/opt/smoke/emulated.toml"
    config=(OUTPOST_CONFIG=/opt/smoke/emulated.toml)
fi
say "glibc here: $(in_root "$smoke_root" ldd --version | head -n1)"
code=0
in_root "${cpuinfo[@]}" "$smoke_root" env "${config[@]}" bash /opt/smoke/smoke_test.sh \
    "/opt/$name/outpost" || code=$?
(( code == 0 )) || die "the smoke test of $name failed in a $SUITE root (exit $code)"

# The release as a device gets it: `outpost install --from` the tarball, which must match
# its .sha256; a tampered copy is refused. Then the device's NVIDIA Python packages are
# looked for in /opt/outpost/site-packages (a stand-in tensorrt package here: found, so
# the reason TensorRT does not serve becomes the missing GPU, not a missing package).
mkdir -p "$smoke_root/opt/dl" "$smoke_root/opt/tampered"
cp "$tarball" "$tarball.sha256" "$smoke_root/opt/dl/"
cp "$tarball" "$tarball.sha256" "$smoke_root/opt/tampered/"
printf '\0' >> "$smoke_root/opt/tampered/$base"
say "install from the tarball, and refuse a tampered one"
in_root "${cpuinfo[@]}" "$smoke_root" bash -euc '
    exe=$1 base=$2
    out=$("$exe" install --root /tmp/device --from "/opt/dl/$base")
    [[ "$out" == *"matches its .sha256"* ]] || { echo "no checksum line in: $out"; exit 1; }
    /tmp/device/opt/outpost/current/outpost --version
    if out=$("$exe" install --root /tmp/tampered --from "/opt/tampered/$base" 2>&1); then
        echo "a tampered release was installed"; exit 1
    fi
    [[ "$out" == *"SHA-256"*"refused"* && ! -e /tmp/tampered/opt ]] \
        || { echo "not refused as it should be: $out"; exit 1; }
    echo "refused: ${out:0:120}..."
' install "/opt/$name/outpost" "$base" || die "installing $name from its tarball went wrong"
mkdir -p "$smoke_root/opt/outpost/site-packages/tensorrt"
echo '__version__ = "0.0.0+standin"' > "$smoke_root/opt/outpost/site-packages/tensorrt/__init__.py"
reason=$(in_root "${cpuinfo[@]}" "$smoke_root" "/opt/$name/outpost" info --json \
    | sed -n 's/.*"engine_reason": "\(.*\)",*$/\1/p')
[[ "$reason" == *"no usable NVIDIA GPU"* ]] \
    || die "the release did not find tensorrt in /opt/outpost/site-packages: $reason"
say "site-packages: found the stand-in tensorrt ($reason)"
layout="layout measured"
(( ${#config[@]} == 0 )) || layout="layout fixed by /opt/smoke/emulated.toml"
say "$name passed the smoke test in a $SUITE root ($layout) in $(( $(date +%s) - start )) s"
exit 0
}
