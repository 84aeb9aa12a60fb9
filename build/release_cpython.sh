#!/usr/bin/env bash
# Build CPython 3.11 from Debian's python3.11 source package. Runs INSIDE the x86_64
# bullseye build root (build/release.sh copies it there), so what it builds links against
# glibc 2.31:
#
#   release_cpython.sh native           build and install into $PY_PREFIX
#   release_cpython.sh cross-aarch64    cross-compile for arm64 with bullseye's
#                                       aarch64-linux-gnu-gcc and the :arm64 -dev packages
#                                       (multiarch); install under /build/stage-arm64
#
# The source: Debian's upstream tarball plus Debian's patches from the first CVE fix in
# its series on (the security and upstream fixes it carries for 3.11); Debian's own
# layout patches before them (multiarch paths, ensurepip removed, ...) are left out.
# No PGO or LTO (--enable-optimizations, --with-lto) and no test suite: CI builds this
# cold on 2 cores. --enable-shared: PyInstaller bundles libpython.
set -euo pipefail

mode=${1:?native or cross-aarch64}
PY_PREFIX=${PY_PREFIX:-/opt/python3.11}
SOURCE_SUITE=${SOURCE_SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
src=/build/src

if ! compgen -G "$src/python3.11_*.dsc" >/dev/null; then
    echo "deb-src $MIRROR $SOURCE_SUITE main" > /etc/apt/sources.list.d/python3.11-source.list
    apt-get -q update
    mkdir -p "$src" && chown _apt "$src" 2>/dev/null || true
    (cd "$src" && apt-get source --download-only python3.11)
fi
dsc=$(ls "$src"/python3.11_*.dsc | tail -n1)
debian_version=$(sed -n 's/^Version: //p' "$dsc")
upstream=${debian_version%%-*}

tree=/build/cpython-$mode
rm -rf "$tree" && mkdir -p "$tree"
tar -xzf "$src/python3.11_$upstream.orig.tar.gz" -C "$tree" --strip-components=1
mkdir -p "$tree/debian-src"
tar -xJf "$src"/python3.11_"$debian_version".debian.tar.xz -C "$tree/debian-src"
patches="$tree/debian-src/debian/patches"
applied=0
while read -r patch; do
    patch -d "$tree" -p1 -s --no-backup-if-mismatch < "$patches/$patch"
    applied=$((applied + 1))
done < <(sed -n '/^CVE-/,$p' "$patches/series" | grep -v -e '^#' -e '^$')
echo "python3.11 $debian_version: upstream $upstream with $applied of Debian's fixes"
# Debian builds pyexpat into libpython (Py_BUILD_CORE_BUILTIN); here it is a shared module,
# and the pycore_ header its CVE-2026-4224 fix includes needs what upstream's pyexpat.c has
# at its top in later 3.11 releases.
expat="$tree/Modules/pyexpat.c"
if grep -q '^#include "pycore_' "$expat" && ! grep -q Py_BUILD_CORE_MODULE "$expat"; then
    sed -i '1i #ifndef Py_BUILD_CORE_BUILTIN\n#  define Py_BUILD_CORE_MODULE 1\n#endif' "$expat"
fi

common=(--prefix="$PY_PREFIX" --enable-shared --with-ensurepip=no
        LDFLAGS="-Wl,-rpath,$PY_PREFIX/lib")
mkdir -p "$tree/out" && cd "$tree/out"
case "$mode" in
    native)
        ../configure "${common[@]}"
        make -j"$(nproc)"
        rm -rf "$PY_PREFIX"
        make install
        ;;
    cross-aarch64)
        # The build Python is the native one built just before, the same 3.11.
        # These checks run test programs, which a cross build cannot: their answers on
        # arm64 Linux with glibc.
        CONFIG_SITE=/dev/null ac_cv_file__dev_ptmx=yes ac_cv_file__dev_ptc=no \
        ac_cv_buggy_getaddrinfo=no PKG_CONFIG_LIBDIR=/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig \
            ../configure "${common[@]}" --build=x86_64-linux-gnu --host=aarch64-linux-gnu \
            --with-build-python="$PY_PREFIX/bin/python3.11"
        make -j"$(nproc)"
        rm -rf /build/stage-arm64
        make install DESTDIR=/build/stage-arm64
        ;;
    *) echo "release_cpython.sh: unknown mode '$mode' (native, cross-aarch64)" >&2; exit 2 ;;
esac
# Where it came from (build/release.sh copies it into each release's BUILD-INFO.txt).
dest=$PY_PREFIX
[[ "$mode" == native ]] || dest=/build/stage-arm64$PY_PREFIX
echo "python3.11 $debian_version (Debian's source, $applied fixes), built on $(. /etc/os-release \
    && echo "$PRETTY_NAME")" > "$dest/SOURCE.txt"
rm -rf "$tree"
