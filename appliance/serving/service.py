"""The service: the one seam every transport calls (socket, HTTP, gRPC).

A typed ``InferRequest`` in, an ``InferResponse`` out (``contract.py``); every check of a
request (its model and version, outputs, inputs, priority, deadline) happens here, once,
whatever transport it came from. Descriptions, statistics and the model-control ops are
here too, so a transport needs nothing else. ``infer`` answers through a callback, so the
socket path needs no task or future per request; ``infer_async`` awaits the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from appliance.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutpostError,
    Unavailable,
)
from appliance.models.manager import ModelManager
from appliance.models.traffic import TrafficPolicy
from appliance.models.versions import ServedVersion, VersionState
from appliance.observe.protocols import ProtocolCounts
from appliance.scheduling.request import QueuedRequest, cancel_request
from appliance.serving.contract import InferRequest, InferResponse, ModelStatus, VersionInfo
from appliance.serving.fields import model_name, version_number
from appliance.serving.router import Router
from appliance.serving.shared_memory import SharedMemoryRegistry

SERVER_NAME = "outpost"

# reply(response, error): exactly one of them is None; called on the event loop.
Reply = Callable[[InferResponse | None, OutpostError | None], None]


class Service:
    def __init__(self, manager: ModelManager):
        self.manager = manager
        self.router = Router(manager)
        self.draining = False
        self.started = time.time()
        # Regions clients registered (Triton's system shared memory), for every transport
        self.shared_memory = SharedMemoryRegistry()
        self.protocol_counts = ProtocolCounts()
        # The OTA agent running in this process, if any: its handler of the app's word
        # on activation (update_activation), plugged in by the composition root
        self.update_agent: Callable[[dict], Awaitable[dict]] | None = None

    # -- infer ---------------------------------------------------------------------------

    def infer(self, request: InferRequest, reply: Reply, tag=None) -> QueuedRequest:
        """Route, check and queue; ``reply`` runs on the loop once it is answered.

        Raises OutpostError for a request that can't be queued at all (counted as a failure
        of the version it was routed to)."""
        if self.draining:
            raise Unavailable("the server is shutting down; retry against its successor")
        lv, shadow = self.router.route(request.model, request.version, request.routing_key)
        try:
            if lv.state is VersionState.FAILED:
                raise FailedPrecondition(
                    f"{lv.error}; fix it, then load it again (the 'load' op)")
            if request.wire_error is not None:
                raise request.take_wire_error()
            wanted = request.outputs
            if wanted is not None:
                _check_outputs(lv, wanted)
            feeds = request.inputs
            on_live = None
            name, version = lv.name, lv.version

            def done(outputs, error) -> None:
                if error is not None:
                    reply(None, error)
                    return
                if on_live is not None:
                    on_live(outputs)
                if wanted is not None:
                    outputs = {n: outputs[n] for n in wanted}
                reply(InferResponse(name, version, outputs), None)

            queued = lv.request_from_arrays(feeds, request.priority, request.deadline, done,
                                            tag)
        except OutpostError as exc:  # counted like any failure, on every transport
            lv.stats.request_failed(exc.code)
            raise
        lv.submit(queued)
        if shadow is not None:
            on_live = self.router.shadow_copy(name, shadow, feeds, lv)
        return queued

    async def infer_async(self, request: InferRequest, *,
                          limit_s: float | None = None) -> InferResponse:
        """``infer`` as an awaitable; a cancelled caller drops its queued request.

        ``limit_s``: the transport's own bound on the wait (HTTP's request_timeout_s);
        past it the request is dropped, counted as DEADLINE_EXCEEDED, and TimeoutError
        raised for the transport to answer in its own words."""
        answer: asyncio.Future = asyncio.get_running_loop().create_future()

        def reply(response, error) -> None:
            if not answer.done():
                answer.set_result((response, error))

        queued = self.infer(request, reply)
        try:
            async with asyncio.timeout(limit_s):
                response, error = await answer
        except TimeoutError:
            cancel_request(queued)
            stats = getattr(queued.owner, "stats", None)
            if stats is not None:
                stats.request_failed("DEADLINE_EXCEEDED")
            raise
        except BaseException:
            cancel_request(queued)
            raise
        if error is not None:
            raise error
        return response

    @staticmethod
    def cancel(queued: QueuedRequest) -> None:
        """The caller went away: drop the request if it is still queued; no reply."""
        cancel_request(queued)

    # -- what is served --------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return not self.draining and self.manager.ready()

    def models(self) -> list[ModelStatus]:
        """Every model in the repository, each version's state here."""
        out = []
        for rec in self.manager.repo.models():
            versions = []
            for v in rec.versions:
                lv = self.manager.loaded.get((rec.name, v.version))
                if lv is not None:
                    versions.append((v.version, lv.state.value, lv.engine_kind, lv.error))
                else:
                    versions.append((v.version, "bad" if v.state == "bad" else "unloaded",
                                     None, "marked bad" if v.state == "bad" else "unloaded"))
            out.append(ModelStatus(rec.name, self.manager.active.get(rec.name,
                                                                     rec.active_version),
                                   tuple(versions)))
        return out

    def describe(self, model: object, version: object = None) -> VersionInfo:
        """A served version (the active one when ``version`` is None), without loading it:
        a version not loaded now is described from its stored config, not ready."""
        lv = self.manager.get(model_name(model), version_number(version), load=False)
        return self._info(lv)

    def served_versions(self, model: object) -> list[int]:
        """The versions of ``model`` servable now: active, version policy, traffic."""
        name = model_name(model)
        if name not in self.manager.active:
            raise NotFound(f"model '{name}' is not served here; the 'models' op lists what is")
        return sorted(self.manager.resident_versions(name))

    def statistics(self, model: object = None) -> list[VersionInfo]:
        """Every loaded version (of ``model``, when given), with its figures."""
        if model is not None and not isinstance(model, str):
            raise InvalidArgument("'model' must be a string")
        rows = [self._info(lv) for (name, _), lv in sorted(self.manager.loaded.items())
                if model is None or name == model]
        if model is not None and not rows:
            raise NotFound(f"model '{model}' is not loaded here")
        return rows

    def memory(self) -> dict:
        """The memory account: budget, baseline, measured bytes, instances and evictions
        per version (models/manager.py ``residency``)."""
        return self.manager.residency()

    def traffic_figures(self, model: str | None = None) -> dict[str, dict]:
        """Per model with a policy or routed requests: the policy, requests routed to each
        version, and the shadow's comparison with the live answers."""
        out = {}
        for name in sorted(self.manager.active):
            if model is None or name == model:
                snap = self.router.snapshot(name)
                if snap is not None:
                    out[name] = snap
        return out

    def _info(self, lv: ServedVersion) -> VersionInfo:
        return VersionInfo(
            name=lv.name, version=lv.version, state=lv.state.value,
            ready=lv.state is VersionState.READY, error=lv.error,
            engine_kind=lv.engine_kind, inputs=lv.inputs, outputs=lv.outputs,
            max_batch_size=lv.max_batch_size,
            preferred_batch_sizes=tuple(getattr(lv, "preferred_batch_sizes", ())),
            instances=getattr(lv, "instance_count", 0), config=lv.config,
            active=self.manager.active.get(lv.name) == lv.version,
            inflight=lv.inflight_count(), stats=lv.stats,
            layout=lv.layout.as_dict() if getattr(lv, "layout", None) else None)

    # -- changing what is served (coroutines: they load models) -------------------------------

    async def activate(self, model: object, version: object) -> dict:
        """Hot swap to ``version`` (loaded and warm first; the old one drains)."""
        name = model_name(model)
        if version is None:
            raise InvalidArgument("'version' must be a positive integer")
        return await self.manager.activate(name, version_number(version))

    async def traffic(self, model: object, change: dict | None = None) -> dict | None:
        """The traffic policy in force for ``model`` after ``change``: None only reads
        it; ``{"clear": true}`` removes the run-time one; ``{"policy": {split, sticky,
        shadow, shadow_timeout_ms}}`` sets one (its versions loaded and warm first)."""
        name = model_name(model)
        if change and change.get("clear"):
            policy = None
        elif change and "policy" in change:
            policy = TrafficPolicy.from_dict(change["policy"], name)
        else:
            if name not in self.manager.active:
                raise NotFound(f"model '{name}' is not served here")
            current = self.manager.traffic_policy(name)
            return current.as_dict() if current else None
        result = await self.manager.set_traffic(name, policy)
        self.router.reset(name)
        return result["traffic"]

    async def update_activation(self, fields: dict) -> dict:
        """The app's word on a pending OTA activation (``action``: allow or defer, with
        ``for_s``; none reads), answered by the update agent (it checks the fields)."""
        if self.update_agent is None:
            raise FailedPrecondition(
                "no update agent runs in this server: add an [updater] table (fleet_url, "
                "trusted_root) to its config and restart it (docs/ota.md)")
        return await self.update_agent(fields)

    async def load(self, model: object, version: object = None) -> VersionInfo:
        """Load (and serve again, after ``unload(stop_serving=True)``) a version of
        ``model``: the repository's active one unless ``version`` says; READY when done."""
        lv = await self.manager.start_serving(model_name(model), version_number(version))
        return self._info(lv)

    async def unload(self, model: object, version: object = None, *,
                     stop_serving: bool = False) -> list[int]:
        """Unload one version, or all of a model's; returns those unloaded.
        ``stop_serving``: also take the model out of routing until it is loaded again."""
        name = model_name(model)
        version = version_number(version)
        if stop_serving:
            return await self.manager.stop_serving(name)
        return await self.manager.unload(name, version)


def _check_outputs(lv: ServedVersion, wanted: object) -> None:
    if not isinstance(wanted, (list, tuple)) or not all(isinstance(w, str) for w in wanted):
        raise InvalidArgument("'outputs' must be a list of output names")
    unknown = [w for w in wanted if w not in lv.output_names]
    if unknown:
        raise InvalidArgument(
            f"output '{unknown[0]}' is not an output of model '{lv.name}'; it has "
            f"{', '.join(sorted(lv.output_names))}")
