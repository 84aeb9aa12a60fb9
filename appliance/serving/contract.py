"""The one request contract: what every transport hands the service, and what it gets back.

A transport decodes its wire format into an ``InferRequest`` (NumPy arrays, its own timeout
field turned into a deadline) and encodes the ``InferResponse``; every check of names,
versions, dtypes, shapes, sizes, priorities and deadlines is the service's, done once.
The fields carry what the wire said: a transport whose format is untyped (msgpack, JSON
parameters) passes the values on and the service refuses the wrong ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from appliance.errors import OutpostError
from appliance.models.model_config import ModelConfig
from appliance.observe.stats import VersionStats
from appliance.scheduling.request import NO_DEADLINE
from engines import TensorSpec

__all__ = ["NO_DEADLINE", "InferRequest", "InferResponse", "ModelStatus", "VersionInfo"]


@dataclass(slots=True, eq=False)
class InferRequest:
    model: str
    inputs: Mapping[str, np.ndarray]
    version: int | None = None  # None: the router picks (the active one, or a split's)
    outputs: Sequence[str] | None = None  # None: every output, in the model's order
    routing_key: str | None = None  # a sticky traffic split routes by it
    priority: int | None = None  # None: the model's default level; lower runs first
    # time.monotonic() seconds; None: the model's default_timeout_ms; NO_DEADLINE: none
    deadline: float | None = None
    # What the transport could not decode (a tensor, its timeout field): raised by the
    # service after the model lookup, so an unknown model is NOT_FOUND on every transport
    # whatever else is wrong with the request.
    wire_error: OutpostError | None = None

    def take_wire_error(self) -> OutpostError:
        """The wire error, taken off the request to be raised: the traceback it gets
        holds the raising frame, and through it the request would be held in a cycle
        (with its arrays) until the cyclic collector ran. No local keeps it either."""
        error, self.wire_error = self.wire_error, None
        return error


@dataclass(slots=True, eq=False)
class InferResponse:
    model: str
    version: int  # the version that answered
    outputs: dict[str, np.ndarray]  # the outputs asked for, in the order asked


@dataclass(frozen=True)
class VersionInfo:
    """One model version as the service describes it: loaded, or from its stored config."""

    name: str
    version: int
    state: str  # loading | ready | unloading | unloaded | failed
    ready: bool
    error: str
    engine_kind: str  # onnxruntime | tensorrt | ensemble
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]  # in effect (measured at load, or configured)
    instances: int
    config: ModelConfig
    active: bool
    inflight: int
    stats: VersionStats
    layout: dict | None  # threads, instances, spinning, preferred_batch, source, reason


@dataclass(frozen=True)
class ModelStatus:
    """A model in the repository and the state of each of its versions here."""

    name: str
    active_version: int | None
    # (version, state, engine kind or None, reason): state loading | ready | unloading
    # | unloaded | failed | bad (marked bad by the updater)
    versions: tuple[tuple[int, str, str | None, str], ...]
