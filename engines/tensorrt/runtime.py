"""A TensorRT session: one execution context and one CUDA stream per model instance.

Device buffers and pinned host staging are sized once from the optimisation profile's
maximum shapes and reused for every batch. A batch is: copy each input into its pinned
staging area, enqueue the host-to-device copy, ``set_input_shape`` for every input,
``execute_async_v3`` on the instance's stream, enqueue the device-to-host copies of the
outputs at the shapes the context reports, synchronize, and hand back copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engines.base import Session, TensorSpec
from engines.errors import LoadError, RunError
from engines.tensorrt.cuda import CudaApi, DeviceBuffer, PinnedBuffer


@dataclass
class _Binding:
    """One IO tensor: its spec, the profile's shape bounds, and its reused buffers."""

    name: str
    is_input: bool
    dtype: np.dtype
    spec_shape: tuple
    min_shape: tuple
    opt_shape: tuple
    max_shape: tuple
    device: DeviceBuffer | None = None
    host: PinnedBuffer | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.max_shape) * self.dtype.itemsize


def _np_dtype(trt, trt_dtype, name: str) -> np.dtype:
    try:
        return np.dtype(trt.nptype(trt_dtype))
    except (TypeError, ValueError) as exc:
        raise LoadError(f"tensor '{name}' has TensorRT type {trt_dtype}, which has no NumPy "
                        f"equivalent outpost can carry; keep model inputs and outputs in "
                        f"fp32/fp16/int types") from exc


class TensorRTSession(Session):
    def __init__(self, trt, cuda: CudaApi, engine, device_index: int, max_batch_size: int,
                 on_close=None):
        self._trt = trt
        self._on_close = on_close
        self._cuda = cuda
        self._engine = engine  # shared by the instances; each holds its own context
        self._device = device_index
        self.max_batch_size = max_batch_size
        self._bindings: list[_Binding] = []
        self._context = None
        self._stream = None
        with cuda.activate(device_index):
            try:
                self._setup()
            except BaseException:
                self._release()
                raise

    def _setup(self) -> None:
        trt, engine = self._trt, self._engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise LoadError("TensorRT could not create an execution context (out of device "
                            "memory?); lower the model's instances or max_batch_size")
        self._stream = self._cuda.stream()
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(name)
        for name in inputs:
            shape = tuple(engine.get_tensor_shape(name))
            dtype = _np_dtype(trt, engine.get_tensor_dtype(name), name)
            if -1 in shape:
                lo, opt, hi = (tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
            else:
                lo = opt = hi = shape
            self._bindings.append(_Binding(name, True, dtype, shape, lo, opt, hi))
        # Output bounds: what the context infers with every input at its profile maximum.
        for b in self._bindings:
            if not self._context.set_input_shape(b.name, b.max_shape):
                raise LoadError(f"TensorRT refused input '{b.name}' at its profile maximum "
                                f"{list(b.max_shape)}")
        for name in outputs:
            shape = tuple(engine.get_tensor_shape(name))
            hi = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in hi):
                raise LoadError(f"output '{name}' has a data-dependent shape {list(hi)}, which "
                                f"outpost's TensorRT engine does not serve; use onnxruntime")
            dtype = _np_dtype(trt, engine.get_tensor_dtype(name), name)
            self._bindings.append(_Binding(name, False, dtype, shape, hi, hi, hi))
        for b in self._bindings:
            b.device = self._cuda.alloc(b.nbytes)
            b.host = self._cuda.pinned(b.nbytes)
            if not self._context.set_tensor_address(b.name, b.device.ptr):
                raise LoadError(f"TensorRT refused the device address of '{b.name}'")
        self.inputs = tuple(TensorSpec(b.name, b.dtype.name, b.spec_shape)
                            for b in self._bindings if b.is_input)
        self.outputs = tuple(TensorSpec(b.name, b.dtype.name, b.spec_shape)
                             for b in self._bindings if not b.is_input)

    def _check(self, b: _Binding, arr: np.ndarray) -> np.ndarray:
        if arr.dtype != b.dtype:
            raise RunError(f"input '{b.name}' is {arr.dtype.name}; the engine takes "
                           f"{b.dtype.name}")
        if arr.ndim != len(b.min_shape) or any(
                not lo <= d <= hi
                for d, lo, hi in zip(arr.shape, b.min_shape, b.max_shape, strict=True)):
            raise RunError(f"input '{b.name}' has shape {list(arr.shape)}; the engine was "
                           f"built for {list(b.min_shape)} to {list(b.max_shape)}")
        return np.ascontiguousarray(arr)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [b.name for b in self._bindings if b.is_input and b.name not in feeds]
        if missing:
            raise RunError(f"inputs {', '.join(missing)} missing from the batch")
        cuda, ctx, stream = self._cuda, self._context, self._stream
        with cuda.activate(self._device):
            for b in self._bindings:
                if not b.is_input:
                    continue
                arr = self._check(b, feeds[b.name])
                flat = arr.reshape(-1).view(np.uint8)
                b.host.array[:flat.nbytes] = flat
                cuda.copy_to_device(b.device, b.host, flat.nbytes, stream)
                if not ctx.set_input_shape(b.name, arr.shape):
                    raise RunError(f"TensorRT refused shape {list(arr.shape)} for input "
                                   f"'{b.name}'")
            shapes = {}
            for b in self._bindings:
                if not b.is_input:
                    shape = tuple(ctx.get_tensor_shape(b.name))
                    if any(d < 0 for d in shape):
                        raise RunError(f"TensorRT could not infer the shape of output "
                                       f"'{b.name}' ({list(shape)})")
                    shapes[b.name] = shape
            if not ctx.execute_async_v3(stream.handle):
                raise RunError("TensorRT failed to enqueue the batch (execute_async_v3)")
            for b in self._bindings:
                if not b.is_input:
                    n = math.prod(shapes[b.name]) * b.dtype.itemsize
                    cuda.copy_to_host(b.host, b.device, n, stream)
            stream.synchronize()
        out = {}
        for name, shape in shapes.items():
            b = next(x for x in self._bindings if x.name == name)
            raw = b.host.array[:math.prod(shape) * b.dtype.itemsize]
            out[name] = raw.view(b.dtype).reshape(shape).copy()  # staging is reused
        return out

    def device_memory_bytes(self) -> int:
        """GPU memory this instance holds that RSS does not show: its execution context's
        activation memory (``device_memory_size_v2``, what each context allocates) and
        its IO buffers. The weights are the engine's, once for all its instances: the
        caller counts them from the plan file."""
        engine = self._engine
        size = getattr(engine, "device_memory_size_v2", None)
        if size is None:  # TensorRT before 10.1
            size = engine.device_memory_size
        return int(size) + sum(b.nbytes for b in self._bindings)

    def warmup(self) -> None:
        """Run at the profile's minimum and optimum shapes, so neither is slow later."""
        for pick in (lambda b: b.min_shape, lambda b: b.opt_shape):
            self.run({b.name: np.zeros(pick(b), b.dtype)
                      for b in self._bindings if b.is_input})

    def close(self) -> None:
        with self._cuda.activate(self._device):
            self._release()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    def _release(self) -> None:
        self._context = None  # before the memory it was bound to
        for b in self._bindings:
            for buf in (b.device, b.host):
                if buf is not None:
                    buf.free()
            b.device = b.host = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
