"""Handing the process's freed heap back to the system.

glibc keeps what the program frees for its next allocations, so a burst (a thousand
connections, a stream of large malformed frames) leaves a high-water mark in RSS long after
the memory was freed. ``trim`` returns the free pages (``malloc_trim``); the server calls it
every ``TRIM_INTERVAL_S``, which costs the few large buffers still in use a page fault each
the next time they are written. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger("outpost.memory")

TRIM_INTERVAL_S = 10.0


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim() -> bool:
    """Hand the heap's free pages back to the system; whether any were."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False



_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set (RSS) now; 0 where /proc is absent."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


def settled_resident_bytes() -> int:
    """RSS after handing freed heap back: what the process holds, not what it once did."""
    trim()
    return resident_bytes()
