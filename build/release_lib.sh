# Shared by build/release.sh and build/release_smoke.sh (sourced, not run): the checks a
# release host must pass, Debian bullseye roots made with debootstrap and cached, and
# running a command inside one.
#
# Environment (all optional):
#   OUTPOST_RELEASE_CACHE   roots, CPython builds, pip's cache, logs (~/.cache/outpost-release)
#   OUTPOST_DEBIAN_MIRROR   Debian's archive (http://deb.debian.org/debian)
#   OUTPOST_BINFMT_DIR      where binfmt_misc is mounted (/proc/sys/fs/binfmt_misc)

SUITE=bullseye              # glibc 2.31: the floor (build/glibc_floor.py holds the bundle to it)
SOURCE_SUITE=bookworm       # where Debian's python3.11 source package comes from
PY_PREFIX=/opt/python3.11   # CPython's prefix inside a build root
CACHE="${OUTPOST_RELEASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outpost-release}"
MIRROR="${OUTPOST_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BINFMT_DIR="${OUTPOST_BINFMT_DIR:-/proc/sys/fs/binfmt_misc}"
ROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

die() { echo "$ME: $*" >&2; exit 1; }
say() { echo "$ME: $*"; }

# ARCH (x86_64, aarch64) -> Debian's name for it; anything else is refused.
debian_arch() {
    case "$1" in
        x86_64) echo amd64 ;;
        aarch64) echo arm64 ;;
        *) echo "$ME: unknown ARCH '$1': use x86_64 or aarch64" >&2; return 2 ;;
    esac
}

# What the host needs before anything is downloaded: debootstrap, chroot, unshare; for
# aarch64, qemu-user-static registered with binfmt_misc (the arm64 root's programs run
# under it); root (debootstrap, chroot and mounts). One line each, naming what to do.
check_host() {  # check_host ARCH
    local arch=$1 tool
    [[ "$(uname -m)" == x86_64 ]] || die "release builds run on an x86_64 host (this is" \
        "$(uname -m)); aarch64 is cross-built there"
    if [[ "$arch" == aarch64 ]]; then
        command -v qemu-aarch64-static >/dev/null || die "aarch64 needs qemu-aarch64-static" \
            "to run the arm64 root: apt-get install -y qemu-user-static binfmt-support"
        [[ -e "$BINFMT_DIR/register" ]] || die "binfmt_misc is not mounted at $BINFMT_DIR:" \
            "mount -t binfmt_misc binfmt_misc $BINFMT_DIR && update-binfmts --enable qemu-aarch64"
        [[ "$(head -n1 "$BINFMT_DIR/qemu-aarch64" 2>/dev/null)" == enabled ]] \
            || die "qemu-aarch64 is not registered with binfmt_misc: update-binfmts --enable" \
                   "qemu-aarch64 (package binfmt-support, with qemu-user-static)"
    fi
    command -v debootstrap >/dev/null \
        || die "debootstrap is not installed: apt-get install -y debootstrap"
    for tool in chroot unshare mount flock tar sha256sum; do
        command -v "$tool" >/dev/null || die "$tool is not on PATH (coreutils, util-linux, tar)"
    done
    [[ "$(id -u)" == 0 ]] || die "needs root (debootstrap, chroot and mounts): sudo $ME $arch"
}

# Debian's archive answers, or one line says it does not (before anything is built).
check_mirror() {
    local url="$MIRROR/dists/$SUITE/Release"
    if command -v wget >/dev/null; then
        wget -q --spider --timeout=20 --tries=2 "$url" 2>/dev/null && return 0
    elif curl -fsS -o /dev/null --max-time 20 --retry 1 "$url" 2>/dev/null; then
        return 0
    fi
    die "Debian's archive is not reachable ($url); check the network, or set" \
        "OUTPOST_DEBIAN_MIRROR to a mirror that serves $SUITE"
}

# Run a stage, its output into a log; on failure, name the stage, show the log's end, exit.
LOGS="$CACHE/logs"
stage() {  # stage NAME COMMAND...
    local name=$1 start log code=0
    shift
    mkdir -p "$LOGS"
    log="$LOGS/$name.log"
    say "$name ..."
    start=$(date +%s)
    # In the background, so that set -e holds inside COMMAND (an `||` would switch it off)
    ( "$@" ) > "$log" 2>&1 &
    wait $! || code=$?
    if (( code != 0 )); then
        echo "$ME: $name failed (exit $code); the end of $log:" >&2
        tail -n 25 "$log" | sed 's/^/    /' >&2
        exit 1
    fi
    say "$name done in $(( $(date +%s) - start )) s"
}

# Run COMMAND inside ROOT with a bare environment, in a mount namespace of its own: /proc,
# /dev and /sys are mounted there and vanish with the namespace, whatever happens.
#   in_root [--bind HOSTDIR:DIR]... [--cpuinfo FILE] ROOT COMMAND...
# --cpuinfo: an ARM /proc/cpuinfo over the host's; under qemu-user, onnxruntime reads the
# x86 one and crashes at import.
in_root() {
    local binds=() cpuinfo=""
    while [[ "$1" == --* ]]; do
        case "$1" in
            --bind) binds+=("$2"); shift 2 ;;
            --cpuinfo) cpuinfo=$2; shift 2 ;;
        esac
    done
    local root=$1 var pass=()
    shift
    for var in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
        [[ -z "${!var:-}" ]] || pass+=("$var=${!var}")  # a proxy apt and pip must go through
    done
    (( ${#pass[@]} == 0 )) || set -- env "${pass[@]}" "$@"
    unshare --mount --propagation private -- bash -euc '
        root=$1 cpuinfo=$2 nbinds=$3; shift 3
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        mount --rbind /sys "$root/sys"
        [[ -z "$cpuinfo" ]] || mount --bind "$cpuinfo" "$root/proc/cpuinfo"
        for (( i = 0; i < nbinds; i++ )); do
            mkdir -p "$root/${1#*:}" && mount --bind "${1%%:*}" "$root/${1#*:}"
            shift
        done
        exec chroot "$root" /usr/bin/env -i PATH="'"$ROOT_PATH"'" HOME=/root LANG=C.UTF-8 \
            DEBIAN_FRONTEND=noninteractive "$@"
    ' in_root "$root" "$cpuinfo" "${#binds[@]}" ${binds[@]+"${binds[@]}"} "$@"
}

# An ARM /proc/cpuinfo (a Cortex-A78AE, as on Jetson Orin) with as many cores as the host.
arm_cpuinfo() {  # arm_cpuinfo FILE
    local i
    for (( i = 0; i < $(nproc); i++ )); do
        printf '%s\n' "processor	: $i" "BogoMIPS	: 62.50" "Features	: fp asimd evtstrm aes \
pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" \
            "CPU implementer	: 0x41" "CPU architecture: 8" "CPU variant	: 0x0" \
            "CPU part	: 0xd42" "CPU revision	: 1" ""
    done > "$1"
}

# Remove a folder made here; --one-file-system: never into anything still mounted in it.
remove_tree() { [[ ! -e "$1" ]] || rm -rf --one-file-system "$1"; }

# A cached root: $CACHE/bullseye-DEBARCH-KIND (base: debootstrap's minbase, nothing added;
# build: base plus what building needs).
root_dir() { echo "$CACHE/$SUITE-$(debian_arch "$1")-$2"; }

# The pristine bullseye root for ARCH. Made in a temporary folder and renamed when
# complete, so a root that exists is whole. arm64: debootstrap's first stage here, its
# second under qemu-user inside the root.
ensure_base_root() {  # ensure_base_root ARCH
    local arch=$1 debarch root tmp
    debarch=$(debian_arch "$arch")
    root=$(root_dir "$arch" base)
    [[ ! -d "$root" ]] || return 0
    tmp="$CACHE/.tmp-$SUITE-$debarch-base"
    remove_tree "$tmp"
    mkdir -p "$CACHE"
    if [[ "$debarch" == amd64 ]]; then
        stage "debootstrap-$debarch" debootstrap --variant=minbase --arch=amd64 \
            "$SUITE" "$tmp" "$MIRROR"
    else
        stage "debootstrap-$debarch" debootstrap --variant=minbase --arch=arm64 --foreign \
            "$SUITE" "$tmp" "$MIRROR"
        cp /usr/bin/qemu-aarch64-static "$tmp/usr/bin/"
        stage "debootstrap-$debarch-second-stage" unshare --mount --propagation private -- \
            chroot "$tmp" /debootstrap/debootstrap --second-stage
    fi
    rm -f "$tmp/var/cache/apt/archives/"*.deb
    mv -T "$tmp" "$root"
}

# apt-get inside a root: update once, then install PACKAGES (no recommends).
apt_in() {  # apt_in ROOT PACKAGE...
    local root=$1
    shift
    cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    in_root "$root" apt-get -q update
    in_root "$root" apt-get install -y -q --no-install-recommends "$@"
    in_root "$root" apt-get clean
}
