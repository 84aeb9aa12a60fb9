"""A model version as the router and the service see it: its state, its tensor specs, and
the one check of a request against them (``request_from_arrays``: names, dtypes, shapes,
batch size, priority, deadline), for plain versions and ensembles alike."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from appliance.errors import (
    InvalidArgument,
    Unavailable,
)
from appliance.models.model_config import ModelConfig
from appliance.models.repository import VersionRecord
from appliance.observe.stats import VersionStats
from appliance.protocol.tensors import DTYPE_OF_NAME
from appliance.scheduling.request import NO_DEADLINE, QueuedRequest
from engines import TensorSpec
from engines.base import V2_DATATYPES


class VersionState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    FAILED = "failed"


def check_arrays(name: str, specs: tuple[TensorSpec, ...], max_batch_size: int,
                 feeds: dict[str, np.ndarray]) -> tuple[int, tuple]:
    """Dtypes and shapes of ``feeds`` against ``specs``; returns (rows, signature).

    Plain inline loops rather than generators or helpers: this runs for every request."""
    if len(feeds) != len(specs):
        raise _names_error(name, specs, feeds)
    signature = []
    rows = None
    for spec in specs:
        arr = feeds.get(spec.name)
        if arr is None:
            raise _names_error(name, specs, feeds)
        want = DTYPE_OF_NAME[spec.dtype]
        if arr.dtype is not want and arr.dtype != want:
            raise _dtype_error(name, spec, arr.dtype)
        shape = arr.shape
        if len(shape) != len(spec.shape):
            raise _shape_error(name, spec, shape)
        for w, g in zip(spec.shape, shape):
            if w != g and w != -1:
                raise _shape_error(name, spec, shape)
        if max_batch_size:
            n = shape[0]
            if rows is None:
                rows = n
            elif n != rows:
                raise InvalidArgument(
                    f"input '{spec.name}' has {n} rows in dim 0 but other inputs have {rows}; "
                    f"every input of a request carries the same batch")
            signature.append(shape[1:])
    if max_batch_size:
        if not 1 <= rows <= max_batch_size:
            raise InvalidArgument(
                f"the request's batch (dim 0) is {rows}; model '{name}' takes 1 to "
                f"{max_batch_size} rows a request")
    else:
        rows = 1
    return rows, tuple(signature)


def _dtype_error(name: str, spec: TensorSpec, dtype: np.dtype) -> InvalidArgument:
    """Named both ways: the NumPy name (socket, config) and the v2 datatype (HTTP, gRPC)."""
    have, want = dtype.name, spec.dtype
    have_v2, want_v2 = V2_DATATYPES.get(have, have.upper()), V2_DATATYPES.get(want, want)
    return InvalidArgument(
        f"input '{spec.name}' is {have} ({have_v2}) but model '{name}' takes {want} "
        f"({want_v2}); outpost does not cast: send {want}")


def _names_error(name: str, specs: tuple[TensorSpec, ...], feeds: dict) -> InvalidArgument:
    names = {s.name for s in specs}
    missing = sorted(names - feeds.keys())
    if missing:
        return InvalidArgument(
            f"inputs lacks {', '.join(repr(m) for m in missing)}; model '{name}' "
            f"takes {', '.join(sorted(names))}")
    extra = sorted(str(k) for k in feeds.keys() - names)
    return InvalidArgument(
        f"input '{extra[0]}' is not an input of model '{name}'; it takes "
        f"{', '.join(sorted(names))}")


def _shape_error(name: str, spec: TensorSpec, shape: tuple) -> InvalidArgument:
    return InvalidArgument(
        f"input '{spec.name}' has shape {list(shape)} but model '{name}' takes "
        f"{list(spec.shape)} (-1: any size)")


class Members(Protocol):
    """What an ensemble needs of the model manager: the active versions, and its member
    versions loaded (awaited at its own load) or looked up (at each request)."""

    active: dict[str, int]

    async def ensure_loaded(self, name: str, version: int) -> ServedVersion: ...

    def member(self, name: str, version: int | None) -> ServedVersion: ...


class ServedVersion:
    """What the router hands a request to: a model version, ONNX-backed or an ensemble."""

    name: str
    version: int
    config: ModelConfig
    engine_kind: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    output_names: frozenset[str]
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]  # in effect (an ensemble has none: getattr)
    stats: VersionStats
    state: VersionState
    error: str
    last_used: float
    memory_bytes: int

    def request_from_arrays(self, feeds: Mapping[str, np.ndarray], priority: object,
                            deadline: float | None, done, tag=None) -> QueuedRequest:
        """A request for this version, checked: the arrays against its inputs, the
        priority against its levels (None: the default level), the deadline
        (``time.monotonic()`` seconds; None: the model's default_timeout_ms;
        NO_DEADLINE: none; one already past fails as DEADLINE_EXCEEDED once queued)."""
        rows, signature = self.check_arrays(feeds)
        db = self.config.dynamic_batching
        if priority is None:
            priority = db.default_priority_level
        elif type(priority) is not int or not 0 <= priority < db.priority_levels:
            raise InvalidArgument(
                f"priority {priority!r} must be an integer in 0..{db.priority_levels - 1} "
                f"for model '{self.name}' (lower runs first)")
        if deadline is None:
            timeout_ms = db.default_timeout_ms
            deadline = time.monotonic() + timeout_ms / 1e3 if timeout_ms else None
        elif deadline == NO_DEADLINE:
            deadline = None
        return QueuedRequest(feeds, rows, signature, priority, deadline, done, tag)

    def check_arrays(self, feeds: Mapping[str, np.ndarray]) -> tuple[int, tuple]:
        """(rows, signature) of ``feeds``, checked against this version's inputs."""
        return check_arrays(self.name, self.inputs, self.max_batch_size, feeds)

    def submit(self, request: QueuedRequest) -> None:
        raise NotImplementedError

    def inflight_count(self) -> int:
        raise NotImplementedError

    async def unload(self, timeout_s: float | None = None) -> None:
        raise NotImplementedError


def describe_from_config(version: ServedVersion, record: VersionRecord, config: ModelConfig,
              engine_kind: str) -> None:
    """What a model version's stored config says of it, loaded or not."""
    version.name = record.model
    version.version = record.version
    version.config = config
    version.engine_kind = engine_kind
    version.inputs = config.input_specs()
    version.outputs = config.output_specs()
    version.output_names = frozenset(s.name for s in version.outputs)
    version.max_batch_size = config.max_batch_size or 0
    # What the batcher prefers: config.toml's, until a load measures them
    # (auto_preferred_batch)
    version.preferred_batch_sizes = tuple(config.dynamic_batching.preferred_batch_sizes)
    version.stats = VersionStats()
    version.error = ""


class StoredVersion(ServedVersion):
    """A servable version not loaded now, described from its stored config: what metadata
    and readiness probes see, so that asking about a lazy or evicted model does not load
    it (as in Triton, such a model is simply not ready)."""

    def __init__(self, record: VersionRecord, config: ModelConfig, engine_kind: str):
        describe_from_config(self, record, config, engine_kind)
        self.state = VersionState.UNLOADED
        self.last_used = 0.0
        self.memory_bytes = 0

    def submit(self, request: QueuedRequest) -> None:
        raise Unavailable(f"model '{self.name}' version {self.version} is not loaded")

    def inflight_count(self) -> int:
        return 0
