#!/usr/bin/env bash
# Build a release: the one-folder `outpost` executable made on Debian bullseye's userland
# (glibc 2.31), so it starts on Ubuntu 20.04 / JetPack 5 and everything newer.
#
#   build/release.sh ARCH [--out DIR] [--smoke]
#
# ARCH: x86_64 or aarch64. Writes DIR/outpost-VERSION-linux-ARCH.tar.gz and its .sha256
# (DIR defaults to dist/); nothing lands in DIR unless the whole build passed.
#   1. a bullseye root (debootstrap; arm64: under qemu-user) with CPython 3.11 built there
#      from Debian's python3.11 source package (build/release_cpython.sh; aarch64 is
#      cross-compiled in the x86_64 root), both cached under $OUTPOST_RELEASE_CACHE;
#   2. this tree copied in, its dependencies installed from PyPI, build/freeze.sh run there;
#   3. build/glibc_floor.py: fails naming each file and symbol version above the floor;
#   4. the folder packed, its SHA-256 beside it;
#   5. --smoke: build/release_smoke.sh runs build/smoke_test.sh against the unpacked
#      release in a fresh bullseye root, and installs it from the tarball.
# Needs root, debootstrap, and for aarch64 qemu-user-static with binfmt_misc. Cached roots
# make a rerun quick; `rm -r ~/.cache/outpost-release` starts cold.
set -euo pipefail
{  # read whole before it runs: editing this file can't change a running build
ME=release.sh
REPO="$(cd "$(dirname "$0")/.." && pwd)"
source "$REPO/build/release_lib.sh"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
arch="" out="$REPO/dist" smoke=0
while (( $# )); do
    case "$1" in
        --out) [[ $# -ge 2 ]] || { echo "$ME: --out needs a folder" >&2; exit 2; }
               out=$2; shift ;;
        --smoke) smoke=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "$ME: unknown option '$1' (--out DIR, --smoke)" >&2; exit 2 ;;
        *) [[ -z "$arch" ]] || { echo "$ME: one ARCH only (x86_64 or aarch64)" >&2; exit 2; }
           arch=$1 ;;
    esac
    shift
done
[[ -n "$arch" ]] || { echo "$ME: which ARCH? build/release.sh x86_64|aarch64" >&2; exit 2; }
debarch=$(debian_arch "$arch") || exit 2

check_host "$arch"
mkdir -p "$CACHE"
exec 9> "$CACHE/.lock"
flock -n 9 || die "another release build holds $CACHE/.lock; wait for it to finish"
check_mirror
release_start=$(date +%s)

# --- 1. roots and CPython -------------------------------------------------------------
HOST_CA=""
for f in "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    [[ -n "$f" && -f "$f" ]] && { HOST_CA=$f; break; }
done

# A build root: the base root plus what building in it needs, cached whole.
BUILD_PACKAGES_amd64=(build-essential pkg-config patch xz-utils ca-certificates libssl-dev
                      libffi-dev zlib1g-dev libbz2-dev liblzma-dev libsqlite3-dev uuid-dev)
# arm64: CPython is cross-built in the amd64 root, so only its run-time libraries, and
# binutils for PyInstaller (objdump, objcopy).
BUILD_PACKAGES_arm64=(binutils ca-certificates libssl1.1 libffi7 zlib1g libbz2-1.0 liblzma5
                      libsqlite3-0 libuuid1)
CROSS_PACKAGES=(crossbuild-essential-arm64 libssl-dev:arm64 libffi-dev:arm64 zlib1g-dev:arm64
                libbz2-dev:arm64 liblzma-dev:arm64 libsqlite3-dev:arm64 uuid-dev:arm64)

ensure_build_root() {  # ensure_build_root ARCH
    local a=$1 root tmp packages
    root=$(root_dir "$a" build)
    [[ ! -d "$root" ]] || return 0
    ensure_base_root "$a"
    tmp="$CACHE/.tmp-$(basename "$root")"
    remove_tree "$tmp"
    say "copying the base root for the $a build root"
    cp -a "$(root_dir "$a" base)" "$tmp"
    packages="BUILD_PACKAGES_$(debian_arch "$a")[@]"
    stage "build-packages-$(debian_arch "$a")" apt_in "$tmp" "${!packages}"
    mv -T "$tmp" "$root"
}

# CPython in a build root counts as built once it passed this check (in the arm64 root:
# under qemu-user): it runs, with every module the server and pip need.
PY_MODULES="ssl, _hashlib, sqlite3, ctypes, lzma, bz2, zlib, uuid, pyexpat, _elementtree,
    _decimal, _json, _ssl, _asyncio, _multiprocessing, _uuid"
check_python() {  # check_python ROOT [in_root options]
    local root=$1
    shift
    in_root "$@" "$root" "$PY_PREFIX/bin/python3.11" -c "import sys, ${PY_MODULES//$'\n'/}
print(sys.version, ssl.OPENSSL_VERSION)"
    touch "$root$PY_PREFIX/.release-checked"
}

amd64=$(root_dir x86_64 build)
ensure_build_root x86_64
cp "$REPO/build/release_cpython.sh" "$amd64/usr/local/bin/"
if [[ ! -f "$amd64$PY_PREFIX/.release-checked" ]]; then
    stage cpython-amd64 in_root "$amd64" env MIRROR="$MIRROR" SOURCE_SUITE="$SOURCE_SUITE" \
        PY_PREFIX="$PY_PREFIX" release_cpython.sh native
    stage cpython-check-amd64 check_python "$amd64"
fi

root=$amd64
cpuinfo=()
if [[ "$arch" == aarch64 ]]; then
    root=$(root_dir aarch64 build)
    arm_cpuinfo "$CACHE/arm-cpuinfo"
    cpuinfo=(--cpuinfo "$CACHE/arm-cpuinfo")
    ensure_build_root aarch64
    if [[ ! -f "$root$PY_PREFIX/.release-checked" ]]; then
        marker=/var/lib/outpost-release/cross-arm64
        if [[ ! -f "$amd64$marker" ]]; then
            cross() {
                in_root "$amd64" dpkg --add-architecture arm64
                apt_in "$amd64" "${CROSS_PACKAGES[@]}"
                mkdir -p "$(dirname "$amd64$marker")" && touch "$amd64$marker"
            }
            stage cross-packages cross
        fi
        stage cpython-arm64-cross in_root "$amd64" env MIRROR="$MIRROR" \
            SOURCE_SUITE="$SOURCE_SUITE" PY_PREFIX="$PY_PREFIX" release_cpython.sh cross-aarch64
        remove_tree "$root$PY_PREFIX"
        cp -a "$amd64/build/stage-arm64$PY_PREFIX" "$root$PY_PREFIX"
        remove_tree "$amd64/build/stage-arm64"
        stage cpython-check-arm64 check_python "$root" "${cpuinfo[@]}"
    fi
fi

# --- 2. the project, frozen in the root ------------------------------------------------
say "copying this tree into the $arch build root"
remove_tree "$root/src"
mkdir -p "$root/src"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    # tracked and untracked files, not what git ignores (.venv, dist, caches)
    git -C "$REPO" ls-files -z -co --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -e "$REPO/$f" ]] && printf '%s\0' "$f"; done \
        | tar -C "$REPO" --null -T - -cf - | tar -C "$root/src" -xf -
else
    tar -C "$REPO" --exclude=.venv --exclude=dist --exclude=build/work --exclude=.git \
        -cf - . | tar -C "$root/src" -xf -
fi
ca_env=()
if [[ -n "$HOST_CA" ]]; then  # this host's CAs, for pip behind a proxy that re-signs TLS
    cp "$HOST_CA" "$root/etc/ssl/host-ca.crt"
    ca_env=(PIP_CERT=/etc/ssl/host-ca.crt SSL_CERT_FILE=/etc/ssl/host-ca.crt)
fi
mkdir -p "$CACHE/pip-$debarch"
pip_env=(env PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 "${ca_env[@]}")
stage "dependencies-$debarch" in_root "${cpuinfo[@]}" --bind "$CACHE/pip-$debarch:/root/.cache/pip" \
    "$root" "${pip_env[@]}" bash -c "cd /src && $PY_PREFIX/bin/python3.11 -m venv .venv \
        && .venv/bin/pip install -e '.[build]'"
stage "freeze-$debarch" in_root "${cpuinfo[@]}" "$root" bash -c 'cd /src && build/freeze.sh'

# --- 3. the glibc floor -----------------------------------------------------------------
say "glibc floor of the bundle"
if ! in_root "${cpuinfo[@]}" "$root" /src/.venv/bin/python /src/build/glibc_floor.py \
        /src/dist/outpost; then
    die "the $arch build needs more than glibc 2.31 (files named above); nothing was written to $out"
fi

# --- 4. pack ----------------------------------------------------------------------------
version=$(in_root "${cpuinfo[@]}" "$root" /src/dist/outpost/outpost --version | cut -d' ' -f2)
[[ "$version" =~ ^[0-9A-Za-z.+_-]+$ ]] || die "the build says its version is '$version'"
name="outpost-$version-linux-$arch"
info="$root/src/dist/outpost/BUILD-INFO.txt"
commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -z "$(git -C "$REPO" status --porcelain 2>/dev/null)" ]] || commit="$commit (with local changes)"
sed -i "s/^commit unknown$/commit $commit/" "$info"
{
    echo "userland debian $SUITE (glibc $(in_root "$root" ldd --version | head -n1 | awk '{print $NF}'))"
    echo "$(cat "$root$PY_PREFIX/SOURCE.txt")"
} >> "$info"
mkdir -p "$out"
tmp=$(mktemp -d "$out/.release-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
say "packing $name.tar.gz"
tar -C "$root/src/dist" --sort=name --owner=0 --group=0 --numeric-owner \
    --transform "flags=rh;s,^outpost,$name," -czf "$tmp/$name.tar.gz" outpost
(cd "$tmp" && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")
rm -f "$out/$name.tar.gz.sha256"   # the checksum is moved last: present means complete
mv -f "$tmp/$name.tar.gz" "$out/"
mv -f "$tmp/$name.tar.gz.sha256" "$out/"
rmdir "$tmp"   # here, not only by the trap: --smoke execs, and an exec runs no trap
say "built $out/$name.tar.gz ($(du -h "$out/$name.tar.gz" | cut -f1)) in" \
    "$(( $(date +%s) - release_start )) s; sha256 $(cut -d' ' -f1 "$out/$name.tar.gz.sha256")"

# --- 5. smoke ---------------------------------------------------------------------------
if (( smoke )); then
    flock -u 9
    exec "$REPO/build/release_smoke.sh" "$out/$name.tar.gz"
fi
exit 0
}
