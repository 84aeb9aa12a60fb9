"""Python clients for the v1 socket protocol: ``Client`` (blocking) and ``AsyncClient``
(asyncio, pipelined: many requests in flight on one connection).

NumPy in, NumPy out. A failed request raises the typed exception of its protocol code
(``appliance.errors``: ``NotFound``, ``InvalidArgument``, ...); a broken connection raises
``Unavailable``. Output arrays are read-only views over the received frame, or of the
client's shared memory region for outputs directed into one (``shared_memory``).

``core`` is the sans-IO part both share (request ids, frames, results, the ops, each
written once); ``blocking`` and ``aio`` hold only each client's I/O.

May import: appliance.protocol, appliance.errors, appliance.paths.
"""

from __future__ import annotations

from appliance.client.aio import AsyncClient
from appliance.client.blocking import Client
from appliance.client.core import InferResult
from appliance.client.shared_memory import RegionTensor, SharedRegion
from appliance.errors import OutpostError

__all__ = ["AsyncClient", "Client", "InferResult", "OutpostError", "RegionTensor",
           "SharedRegion"]
