"""Shared memory regions on the client's side: create, map, unlink.

``SharedRegion`` is a POSIX shared memory object this process creates (under /dev/shm) and
maps; the clients' ``shared_memory(byte_size)`` context managers register it with the
server and, on the way out, unregister and unlink it. ``region.tensor(shape, dtype,
offset)`` is a window of it: pass it as an input (the server reads the array in place) or
in ``output_regions`` (the server writes the output there), and use ``.array``, a NumPy
view of the window, to fill it or read the answer.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from appliance.errors import InvalidArgument
from appliance.protocol.tensors import NAME_OF_DTYPE

_names = itertools.count(1)


@dataclass(frozen=True)
class RegionTensor:
    """A window of a registered region that holds (or is to hold) one tensor."""

    region: SharedRegion
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def array(self) -> np.ndarray:
        """The window as an array: write an input into it, read an output from it."""
        return np.ndarray(self.shape, self.dtype, self.region.buffer, self.offset)

    def wire(self) -> dict:
        """The tensor map that names the window instead of carrying the bytes."""
        return {"dtype": NAME_OF_DTYPE[self.dtype], "shape": list(self.shape),
                "shm": {"region": self.region.name, "offset": self.offset,
                        "nbytes": self.nbytes}}

    def window(self) -> dict:
        return {"region": self.region.name, "offset": self.offset, "nbytes": self.nbytes}


class SharedRegion:
    """A shared memory object of ``byte_size`` bytes, created and mapped by this process
    and registered with the server under ``name``."""

    def __init__(self, byte_size: int, name: str | None = None):
        if type(byte_size) is not int or byte_size <= 0:
            raise InvalidArgument(f"byte_size must be a positive integer, not {byte_size!r}")
        self.name = name or f"outpost-{os.getpid()}-{next(_names)}"
        self._shm = shared_memory.SharedMemory(create=True, size=byte_size)
        self.key = "/" + self._shm.name.lstrip("/")  # as shm_open takes it
        self.byte_size = byte_size

    @property
    def buffer(self) -> memoryview:
        return self._shm.buf

    def tensor(self, shape, dtype, offset: int = 0) -> RegionTensor:
        dtype = np.dtype(dtype)
        if dtype not in NAME_OF_DTYPE:
            raise InvalidArgument(f"dtype {dtype} can't be sent; use one of "
                                  f"{', '.join(map(str, NAME_OF_DTYPE.values()))}")
        shape = tuple(int(d) for d in shape)
        t = RegionTensor(self, offset, shape, dtype)
        if offset < 0 or offset + t.nbytes > self.byte_size:
            raise InvalidArgument(f"a {t.nbytes}-byte tensor at offset {offset} does not fit "
                                  f"region '{self.name}' ({self.byte_size} bytes)")
        return t

    def register_fields(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": 0, "byte_size": self.byte_size}

    def close(self) -> None:
        """Unmap and unlink (the server's own mapping, if still registered, stays valid
        until it lets go of it)."""
        try:
            self._shm.close()
        except BufferError:  # an array of ours still views it: unmapped when it goes
            pass
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass
