"""The one place that touches CUDA: devices, device buffers, pinned host memory, streams.

Two bindings sit behind one interface, ``CudaApi``: pycuda (``pycuda.driver``) and
cuda-python's ``cuda.bindings.runtime``, for hosts where pycuda cannot be built. Nothing
else in outpost imports either. Every call that can fail without a driver (even
``import``: cuda.bindings raises when libcuda is missing) is wrapped, so a host without a
GPU gets an ``EngineUnavailable`` with the reason, never a crash.

TensorRT uses whatever CUDA context is current on the calling thread, so callers wrap
their TensorRT calls in ``api.activate(device_index)``: pycuda pushes the device's primary
context for the duration; the runtime API selects the device (its primary context).
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import importlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from engines.errors import EngineUnavailable, RunError

BINDINGS = ("pycuda", "cuda.bindings")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


class DeviceBuffer:
    """Device memory of ``nbytes``; ``ptr`` is the address TensorRT binds to."""

    def __init__(self, ptr: int, nbytes: int, release):
        self.ptr = int(ptr)
        self.nbytes = nbytes
        self._release = release

    def free(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


class PinnedBuffer:
    """Page-locked host memory, seen as a flat uint8 array (the staging area for copies)."""

    def __init__(self, array: np.ndarray, release):
        self.array = array
        self.nbytes = array.nbytes
        self._release = release

    def free(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            self.array = np.empty(0, np.uint8)
            release()


class Stream:
    def __init__(self, handle: int, synchronize, release, native=None):
        self.handle = int(handle)  # what execute_async_v3 takes
        self.native = native  # the binding's own object, where it has one
        self._synchronize = synchronize
        self._release = release

    def synchronize(self) -> None:
        self._synchronize()

    def close(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


class CudaApi(abc.ABC):
    """What the TensorRT engine needs from CUDA, whichever binding provides it."""

    name: str

    @abc.abstractmethod
    def device_count(self) -> int:
        """Usable devices; raises EngineUnavailable with the driver's reason when none."""

    @abc.abstractmethod
    def device(self, index: int) -> GpuInfo: ...

    @abc.abstractmethod
    def activate(self, index: int) -> contextlib.AbstractContextManager:
        """Make device ``index`` current on this thread for the ``with`` block."""

    @abc.abstractmethod
    def alloc(self, nbytes: int) -> DeviceBuffer: ...

    @abc.abstractmethod
    def pinned(self, nbytes: int) -> PinnedBuffer: ...

    @abc.abstractmethod
    def stream(self) -> Stream: ...

    @abc.abstractmethod
    def copy_to_device(self, dst: DeviceBuffer, src: PinnedBuffer, nbytes: int,
                       stream: Stream) -> None:
        """Enqueue a host-to-device copy of ``src``'s first ``nbytes`` on ``stream``."""

    @abc.abstractmethod
    def copy_to_host(self, dst: PinnedBuffer, src: DeviceBuffer, nbytes: int,
                     stream: Stream) -> None:
        """Enqueue a device-to-host copy into ``dst``'s first ``nbytes`` on ``stream``."""


def _check_sizes(dst_nbytes: int, src_nbytes: int, nbytes: int) -> None:
    if nbytes > dst_nbytes or nbytes > src_nbytes:
        raise RunError(f"a copy of {nbytes} bytes does not fit its buffers "
                       f"({src_nbytes} -> {dst_nbytes} bytes)")


# -- pycuda -------------------------------------------------------------------------------


class PyCudaApi(CudaApi):
    name = "pycuda"

    def __init__(self):
        try:
            self._drv = importlib.import_module("pycuda.driver")
        except Exception as exc:  # ImportError, or a broken build's OSError
            raise EngineUnavailable(f"pycuda is not usable: {exc}") from exc
        try:
            self._drv.init()
        except Exception as exc:
            raise EngineUnavailable(f"cuInit failed through pycuda: {exc}") from exc
        self._contexts: dict[int, object] = {}

    def device_count(self) -> int:
        try:
            return self._drv.Device.count()
        except Exception as exc:
            raise EngineUnavailable(f"cuDeviceGetCount failed: {exc}") from exc

    def device(self, index: int) -> GpuInfo:
        dev = self._drv.Device(index)
        return GpuInfo(index, dev.name(), tuple(dev.compute_capability()), dev.total_memory())

    @contextlib.contextmanager
    def activate(self, index: int) -> Iterator[None]:
        ctx = self._contexts.get(index)
        if ctx is None:
            ctx = self._contexts[index] = self._drv.Device(index).retain_primary_context()
        ctx.push()
        try:
            yield
        finally:
            self._drv.Context.pop()

    def alloc(self, nbytes: int) -> DeviceBuffer:
        try:
            mem = self._drv.mem_alloc(max(1, nbytes))
        except Exception as exc:
            raise RunError(f"cudaMalloc of {nbytes} bytes failed: {exc}") from exc
        return DeviceBuffer(int(mem), nbytes, mem.free)

    def pinned(self, nbytes: int) -> PinnedBuffer:
        try:
            arr = self._drv.pagelocked_empty(max(1, nbytes), np.uint8)
        except Exception as exc:
            raise RunError(f"pinned allocation of {nbytes} bytes failed: {exc}") from exc
        return PinnedBuffer(arr[:nbytes], arr.base.free)

    def stream(self) -> Stream:
        s = self._drv.Stream()
        return Stream(s.handle, s.synchronize, lambda: None, native=s)

    def copy_to_device(self, dst, src, nbytes, stream) -> None:
        _check_sizes(dst.nbytes, src.nbytes, nbytes)
        if nbytes:
            self._drv.memcpy_htod_async(dst.ptr, src.array[:nbytes], stream.native)

    def copy_to_host(self, dst, src, nbytes, stream) -> None:
        _check_sizes(dst.nbytes, src.nbytes, nbytes)
        if nbytes:
            self._drv.memcpy_dtoh_async(dst.array[:nbytes], src.ptr, stream.native)


# -- cuda-python (cuda.bindings.runtime) -------------------------------------------------


class CudaBindingsApi(CudaApi):
    name = "cuda.bindings"

    def __init__(self):
        try:
            self._rt = importlib.import_module("cuda.bindings.runtime")
        except Exception:
            try:  # cuda-python before 12.6 named it cuda.cudart
                self._rt = importlib.import_module("cuda.cudart")
            except Exception as exc:
                raise EngineUnavailable(f"cuda-python is not usable: {exc}") from exc
        self._h2d = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost

    def _call(self, what: str, fn, *args, unavailable: bool = False):
        try:
            err, *rest = fn(*args)
        except Exception as exc:  # no libcuda at all raises rather than returning
            raise EngineUnavailable(f"{what} failed: {exc}") from exc
        if err != self._rt.cudaError_t.cudaSuccess:
            _, text = self._rt.cudaGetErrorString(err)
            message = f"{what} failed: {err.name}: {text.decode(errors='replace')}"
            raise (EngineUnavailable if unavailable else RunError)(message)
        return rest[0] if len(rest) == 1 else (rest or None)

    def device_count(self) -> int:
        return self._call("cudaGetDeviceCount", self._rt.cudaGetDeviceCount, unavailable=True)

    def device(self, index: int) -> GpuInfo:
        p = self._call("cudaGetDeviceProperties", self._rt.cudaGetDeviceProperties, index,
                       unavailable=True)
        name = p.name.split(b"\0", 1)[0].decode() if isinstance(p.name, bytes) else str(p.name)
        return GpuInfo(index, name, (p.major, p.minor), int(p.totalGlobalMem))

    @contextlib.contextmanager
    def activate(self, index: int) -> Iterator[None]:
        self._call("cudaSetDevice", self._rt.cudaSetDevice, index)
        yield

    def alloc(self, nbytes: int) -> DeviceBuffer:
        ptr = self._call(f"cudaMalloc({nbytes})", self._rt.cudaMalloc, max(1, nbytes))
        return DeviceBuffer(int(ptr), nbytes, lambda: self._rt.cudaFree(ptr))

    def pinned(self, nbytes: int) -> PinnedBuffer:
        ptr = self._call(f"cudaMallocHost({nbytes})", self._rt.cudaMallocHost, max(1, nbytes))
        raw = (ctypes.c_uint8 * max(1, nbytes)).from_address(int(ptr))
        arr = np.ctypeslib.as_array(raw)[:nbytes]
        return PinnedBuffer(arr, lambda: self._rt.cudaFreeHost(ptr))

    def stream(self) -> Stream:
        s = self._call("cudaStreamCreate", self._rt.cudaStreamCreate)
        return Stream(int(s), lambda: self._call("cudaStreamSynchronize",
                                                  self._rt.cudaStreamSynchronize, s),
                      lambda: self._rt.cudaStreamDestroy(s))

    def copy_to_device(self, dst, src, nbytes, stream) -> None:
        _check_sizes(dst.nbytes, src.nbytes, nbytes)
        if nbytes:
            self._call("cudaMemcpyAsync(H2D)", self._rt.cudaMemcpyAsync, dst.ptr,
                       src.array.ctypes.data, nbytes, self._h2d, stream.handle)

    def copy_to_host(self, dst, src, nbytes, stream) -> None:
        _check_sizes(dst.nbytes, src.nbytes, nbytes)
        if nbytes:
            self._call("cudaMemcpyAsync(D2H)", self._rt.cudaMemcpyAsync,
                       dst.array.ctypes.data, src.ptr, nbytes, self._d2h, stream.handle)


_IMPLS = {"pycuda": PyCudaApi, "cuda.bindings": CudaBindingsApi}


def load_cuda(binding: str = "auto") -> CudaApi:
    """The first usable binding (pycuda, then cuda.bindings), or ``binding`` itself.

    Raises EngineUnavailable naming why each binding tried was not usable.
    """
    if binding != "auto" and binding not in _IMPLS:
        raise EngineUnavailable(f"unknown CUDA binding {binding!r}; use auto, "
                                f"{', '.join(BINDINGS)}")
    reasons = []
    for name in (BINDINGS if binding == "auto" else (binding,)):
        try:
            return _IMPLS[name]()
        except EngineUnavailable as exc:
            reasons.append(str(exc))
    raise EngineUnavailable("no usable CUDA binding: " + "; ".join(reasons))


def usable_gpus(api: CudaApi) -> list[GpuInfo]:
    """Every device the driver reports; EngineUnavailable (with the reason) when none."""
    count = api.device_count()
    if count < 1:
        raise EngineUnavailable("the CUDA driver reports no devices")
    return [api.device(i) for i in range(count)]
