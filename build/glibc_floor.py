"""The glibc floor of a bundle: every ELF file's needed symbol versions, held to a floor.

    python build/glibc_floor.py dist/outpost [--glibc 2.31] [--glibcxx 3.4.28]

A frozen folder carries the build host's libraries (libpython, libstdc++, OpenSSL...), and
each names the newest glibc symbol version it was linked against (``.gnu.version_r``).
A file that needs ``GLIBC_2.35`` does not load where glibc is 2.31 (Ubuntu 20.04, JetPack
5), however the rest was built. This reads those requirements straight from the ELF
section headers (no binutils needed) and exits 1, naming the file and the version, for any
``GLIBC_`` above ``--glibc``, and any ``GLIBCXX_`` / ``CXXABI_`` above ``--glibcxx`` /
``--cxxabi`` that no file of the bundle itself defines (a bundled libstdc++ provides its
own). The floors' defaults are Debian bullseye's: glibc 2.31, GCC 10's libstdc++.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
SHT_GNU_VERDEF = 0x6FFFFFFD
SHT_GNU_VERNEED = 0x6FFFFFFE
FLOORS = {"GLIBC": "2.31", "GLIBCXX": "3.4.28", "CXXABI": "1.3.12"}


@dataclass(frozen=True)
class Need:
    file: str  # the bundle's file that needs it
    library: str  # the library it expects to provide it (libc.so.6, libstdc++.so.6)
    version: str  # GLIBC_2.35


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def symbol_versions(path: Path) -> tuple[list[tuple[str, str]], set[str]]:
    """(library, version) pairs the ELF file needs, and the versions it defines; ([], set())
    for a file that is not a 64-bit little-endian ELF with such sections."""
    data = path.read_bytes()
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:  # ELFCLASS64, little-endian
        return [], set()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    needs, defines = [], set()
    for _name, kind, _flags, _addr, offset, _size, link, count, _align, _ent in sections:
        if kind not in (SHT_GNU_VERNEED, SHT_GNU_VERDEF):
            continue
        strings = sections[link][4]  # the linked string table's offset

        def text(at: int, strings: int = strings) -> str:
            end = data.index(b"\0", strings + at)
            return data[strings + at:end].decode()

        entry = offset
        for _ in range(count):
            if kind == SHT_GNU_VERNEED:
                _ver, cnt, file, aux, nxt = struct.unpack_from("<HHIII", data, entry)
                at = entry + aux
                for _ in range(cnt):
                    _hash, _flags2, _other, name, anxt = struct.unpack_from("<IHHII", data, at)
                    needs.append((text(file), text(name)))
                    at += anxt
            else:
                _ver, _flags2, _ndx, cnt, _hash, aux, nxt = struct.unpack_from(
                    "<HHHHIII", data, entry)
                name, _anxt = struct.unpack_from("<II", data, entry + aux)
                defines.add(text(name))
            if not nxt:
                break
            entry += nxt
    return needs, defines


def above_floor(folder: Path, floors: dict[str, str]) -> list[Need]:
    """Every requirement of a file under ``folder`` above its floor, not met in-bundle."""
    needs: list[Need] = []
    defined: set[str] = set()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            with open(path, "rb") as f:
                if f.read(4) != ELF_MAGIC:
                    continue
            wanted, defines = symbol_versions(path)
            defined |= defines
            needs += [Need(str(path.relative_to(folder)), lib, ver) for lib, ver in wanted]
    out = []
    for need in needs:
        family, _, number = need.version.partition("_")
        floor = floors.get(family)
        if floor is None or version_tuple(number) <= version_tuple(floor):
            continue
        if family != "GLIBC" and need.version in defined:  # a bundled libstdc++ has it
            continue
        out.append(need)
    return sorted(set(out), key=lambda n: (n.file, version_tuple(n.version.partition("_")[2])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--glibc", default=FLOORS["GLIBC"])
    ap.add_argument("--glibcxx", default=FLOORS["GLIBCXX"])
    ap.add_argument("--cxxabi", default=FLOORS["CXXABI"])
    args = ap.parse_args(argv)
    if not args.folder.is_dir():
        print(f"glibc_floor: {args.folder} is not a folder (the frozen dist/outpost)",
              file=sys.stderr)
        return 2
    floors = {"GLIBC": args.glibc, "GLIBCXX": args.glibcxx, "CXXABI": args.cxxabi}
    bad = above_floor(args.folder, floors)
    for need in bad:
        print(f"{need.file}: needs {need.version} (from {need.library}), above the floor "
              f"of {need.version.partition('_')[0]} {floors[need.version.partition('_')[0]]}")
    if bad:
        files = len({n.file for n in bad})
        print(f"glibc_floor: {files} file(s) of {args.folder} need more than the floor; "
              f"build them on the floor's userland (build/release.sh)", file=sys.stderr)
        return 1
    print(f"glibc_floor: every ELF file of {args.folder} runs on glibc {args.glibc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
