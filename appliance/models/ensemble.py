"""Ensembles: a pipeline (a DAG of member models, outputs mapped to inputs) or a combiner
(mean, weighted mean, majority vote) over several members' outputs.

An ensemble is served, versioned and routed like any model. It runs no engine itself:
each step is a request to a member version, queued in that member's own batcher, so
members batch across every ensemble request (and their own direct traffic).
Tensor names are checked when the ensemble loads; a missing member or a name that does
not match is refused then, naming them.
"""

from __future__ import annotations

import asyncio
import functools
import time

import numpy as np

from appliance.config.schema import BatchingConfig
from appliance.errors import FailedPrecondition, OutpostError, error_from_wire
from appliance.models.model_config import EnsembleConfig, ModelConfig
from appliance.models.repository import VersionRecord
from appliance.models.versions import Members, ServedVersion, VersionState
from appliance.observe.stats import VersionStats
from appliance.scheduling.clock import LoopClock
from appliance.scheduling.holding import HoldingQueue
from appliance.scheduling.request import DONE, QueuedRequest
from engines import TensorSpec


class EnsembleVersion(ServedVersion):
    engine_kind = "ensemble"

    def __init__(self, record: VersionRecord, config: ModelConfig, members: Members):
        self.name = record.model
        self.version = record.version
        self.record = record
        self.config = config
        self.spec: EnsembleConfig = config.ensemble
        self.members = members
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()
        self.output_names: frozenset[str] = frozenset()
        self.max_batch_size = 0
        self.stats = VersionStats()
        self.state = VersionState.LOADING
        self.error = ""
        self.last_used = time.monotonic()
        self.memory_bytes = 0  # members account for their own
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        # Requests that come while it loads, as many as its own config's queue takes (an
        # ensemble's config is stored as written: the appliance's default where it is not)
        limit = config.dynamic_batching.max_queue_size
        self._held = HoldingQueue(
            f"ensemble '{self.name}' version {self.version}",
            (BatchingConfig.max_queue_size if limit is None else limit) or 1, self.stats,
            LoopClock(asyncio.get_running_loop()))
        # pipeline: per step, member-input -> tensor and member-output -> tensor
        self._in_maps: list[dict[str, str]] = []
        self._out_maps: list[dict[str, str]] = []
        self._combine_output = ""

    def __repr__(self) -> str:
        return f"<EnsembleVersion {self.name}:{self.version} {self.state.value}>"

    # -- load: resolve members, check names, derive the ensemble's own specs -------------

    async def load(self) -> None:
        where = f"ensemble '{self.name}' version {self.version}"
        try:
            members = [await self._member(m.model, m.version, where) for m in (
                self.spec.steps if self.spec.kind == "pipeline" else self.spec.members)]
            if self.spec.kind == "pipeline":
                self._check_pipeline(members, where)
            else:
                self._check_combine(members, where)
        except OutpostError as exc:
            self._fail(str(exc))
            raise FailedPrecondition(self.error) from exc
        self.output_names = frozenset(s.name for s in self.outputs)
        self.state = VersionState.READY
        self._held.release(self._run_held)

    async def _member(self, model: str, version: int | None, where: str) -> ServedVersion:
        if model == self.name:
            raise FailedPrecondition(f"{where}: a member can't be the ensemble itself")
        if model not in self.members.active:
            raise FailedPrecondition(f"{where}: member model '{model}' is not in the "
                                     f"repository; add it first")
        v = version if version is not None else self.members.active[model]
        try:
            return await self.members.ensure_loaded(model, v)
        except OutpostError as exc:
            raise FailedPrecondition(f"{where}: member '{model}' version {v} can't be "
                                     f"served: {exc}") from exc

    def _check_pipeline(self, members: list[ServedVersion], where: str) -> None:
        produced: dict[str, TensorSpec] = {}  # ensemble tensor -> the spec it carries
        consumed: dict[str, TensorSpec] = {}
        for i, (step, m) in enumerate(zip(self.spec.steps, members)):
            label = f"{where}: step {i + 1} (model '{m.name}')"
            names_in = {s.name: s for s in m.inputs}
            names_out = {s.name: s for s in m.outputs}
            bad = sorted(set(step.inputs) - names_in.keys())
            if bad:
                raise FailedPrecondition(f"{label} maps input '{bad[0]}', which the model "
                                         f"lacks; its inputs: {', '.join(sorted(names_in))}")
            bad = sorted(set(step.outputs) - names_out.keys())
            if bad:
                raise FailedPrecondition(f"{label} maps output '{bad[0]}', which the model "
                                         f"lacks; its outputs: "
                                         f"{', '.join(sorted(names_out))}")
            in_map = {n: step.inputs.get(n, n) for n in names_in}
            for member_in, tensor in in_map.items():
                want = names_in[member_in]
                have = produced.get(tensor) or consumed.get(tensor)
                if have is not None and (have.dtype != want.dtype
                                         or len(have.shape) != len(want.shape)):
                    raise FailedPrecondition(
                        f"{label}: tensor '{tensor}' is {have.dtype}{list(have.shape)} but "
                        f"input '{member_in}' takes {want.dtype}{list(want.shape)}")
                if tensor not in produced:
                    consumed.setdefault(tensor, want)
            out_map = {n: step.outputs.get(n, n) for n in names_out}
            for member_out, tensor in out_map.items():
                if tensor in produced or tensor in consumed:
                    raise FailedPrecondition(f"{label}: tensor '{tensor}' is already an "
                                             f"ensemble input or an earlier step's output")
                produced[tensor] = names_out[member_out]
            self._in_maps.append(in_map)
            self._out_maps.append(out_map)
        declared = [t.name for t in self.config.output]
        if declared:
            missing = [n for n in declared if n not in produced]
            if missing:
                raise FailedPrecondition(f"{where}: output '{missing[0]}' is produced by no "
                                         f"step; steps produce {', '.join(sorted(produced))}")
            out_names = declared
        else:
            out_names = list(self._out_maps[-1].values())
        used = {t for m in self._in_maps for t in m.values()} | set(out_names)
        unused = sorted(set(produced) - used)
        if unused:
            raise FailedPrecondition(
                f"{where}: tensor '{unused[0]}' is produced but used by no later step and is "
                f"not an ensemble output; later steps read "
                f"{', '.join(sorted({t for m in self._in_maps for t in m.values()}))}")
        mbs = [m.max_batch_size for m in members]
        self.max_batch_size = 0 if 0 in mbs else min(mbs)
        self.inputs = tuple(TensorSpec(n, s.dtype, s.shape) for n, s in consumed.items())
        self.outputs = tuple(TensorSpec(n, produced[n].dtype, produced[n].shape)
                             for n in out_names)

    def _check_combine(self, members: list[ServedVersion], where: str) -> None:
        first = members[0]
        for m in members[1:]:
            if [s.as_dict() for s in m.inputs] != [s.as_dict() for s in first.inputs]:
                raise FailedPrecondition(
                    f"{where}: members '{first.name}' and '{m.name}' take different inputs "
                    f"({[s.as_dict() for s in first.inputs]} vs "
                    f"{[s.as_dict() for s in m.inputs]}); a combiner feeds all members alike")
        out = self.spec.output
        if not out:
            if len(first.outputs) != 1:
                raise FailedPrecondition(f"{where}: member '{first.name}' has several outputs; "
                                         f"name the one to combine with ensemble.output")
            out = first.outputs[0].name
        specs = []
        for m in members:
            spec = next((s for s in m.outputs if s.name == out), None)
            if spec is None:
                raise FailedPrecondition(f"{where}: member '{m.name}' has no output '{out}'; "
                                         f"its outputs: {', '.join(sorted(m.output_names))}")
            specs.append(spec)
        if any(s.as_dict() != specs[0].as_dict() for s in specs):
            raise FailedPrecondition(f"{where}: members disagree on output '{out}': "
                                     f"{[s.as_dict() for s in specs]}")
        if not np.issubdtype(np.dtype(specs[0].dtype), np.floating):
            raise FailedPrecondition(f"{where}: output '{out}' is {specs[0].dtype}; "
                                     f"combiners work on floating-point scores")
        self._combine_output = out
        mbs = [m.max_batch_size for m in members]
        self.max_batch_size = 0 if 0 in mbs else min(mbs)
        self.inputs = first.inputs
        if self.spec.combiner == "majority_vote":
            self.outputs = (TensorSpec(out, "int64", specs[0].shape[:-1]),)
        else:
            self.outputs = (specs[0],)

    def _fail(self, message: str) -> None:
        self.state = VersionState.FAILED
        self.error = message
        self._held.fail(FailedPrecondition(message))

    # -- serving -----------------------------------------------------------------------------

    def inflight_count(self) -> int:
        return self._inflight + len(self._held)

    def submit(self, request: QueuedRequest) -> None:
        self.last_used = time.monotonic()
        if self.state is VersionState.LOADING:
            self._held.hold(request)
            return
        if self.state is not VersionState.READY:
            raise FailedPrecondition(f"ensemble '{self.name}' version {self.version} is "
                                     f"{self.state.value}{': ' + self.error if self.error else ''}")
        self._run(request)

    def check_arrays(self, feeds) -> tuple[int, tuple]:
        # Its inputs are known once its members are: a request that comes while it loads
        # is held unchecked, and checked as it is released (_run_held).
        if self.state is VersionState.LOADING:
            return 0, ()
        return super().check_arrays(feeds)

    def _run_held(self, request: QueuedRequest) -> None:
        try:
            request.rows, request.signature = self.check_arrays(request.inputs)
        except OutpostError as exc:  # answered by the holding queue, counted here
            self.stats.request_failed(exc.code)
            raise
        self._run(request)

    def _run(self, request: QueuedRequest) -> None:
        self._inflight += 1
        request.enqueued = time.monotonic()
        if self.spec.kind == "pipeline":
            self._run_pipeline(request)
        else:
            self._run_combine(request)

    def _finish(self, request: QueuedRequest, outputs, error: OutpostError | None) -> None:
        self._inflight -= 1
        if self._idle is not None and not self._inflight:
            self._idle.set()
        if request.state == DONE:
            return
        request.state = DONE
        if error is not None:
            self.stats.request_failed(error.code)
            request.done(None, error)
            return
        elapsed = time.monotonic() - request.enqueued
        self.stats.batch_done(request.rows)
        self.stats.request_done(elapsed, 0.0, elapsed)
        request.done(outputs, None)

    def _member_request(self, model: str, version: int | None, feeds, request, done,
                        label: str):
        """Queue one member request; returns an error instead of raising."""
        try:
            member = self.members.member(model, version)
            r = member.request_from_arrays(feeds, None, request.deadline, done)
            member.submit(r)
        except OutpostError as exc:
            return _wrap(exc, label)
        return None

    def _run_pipeline(self, request: QueuedRequest) -> None:
        _PipelineRun(self, request).launch_ready()

    def _run_combine(self, request: QueuedRequest) -> None:
        members = self.spec.members
        results: list = [None] * len(members)
        pending = [len(members)]
        failed = [False]

        def member_done(i: int, outputs, error, label: str) -> None:
            if failed[0]:
                return
            if error is not None:
                failed[0] = True
                self._finish(request, None, _wrap(error, label))
                return
            results[i] = outputs[self._combine_output]
            pending[0] -= 1
            if pending[0] == 0:
                combined = combine(self.spec.combiner, results, [m.weight for m in members])
                self._finish(request, {self._combine_output: combined}, None)

        for i, m in enumerate(members):
            label = f"ensemble '{self.name}' member '{m.model}'"
            err = self._member_request(m.model, m.version, request.inputs, request,
                                       lambda out, e, i=i, label=label:
                                       member_done(i, out, e, label), label)
            if err is not None:
                if not failed[0]:
                    failed[0] = True
                    self._finish(request, None, err)
                return

    async def unload(self, timeout_s: float | None = None) -> None:
        self.state = VersionState.UNLOADING
        if self._inflight:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except TimeoutError:
                pass
        self.state = VersionState.UNLOADED


class _PipelineRun:
    """One request through a pipeline's steps: a step starts once its inputs exist.

    An object, not closures that call each other: closures would form a reference cycle
    holding the request and every intermediate tensor until the cyclic collector ran.
    The member requests hold it through their done callbacks; it holds none of them."""

    __slots__ = ("ensemble", "request", "tensors", "started", "remaining", "failed")

    def __init__(self, ensemble: EnsembleVersion, request: QueuedRequest):
        self.ensemble = ensemble
        self.request = request
        self.tensors = dict(request.inputs)
        self.started = [False] * len(ensemble.spec.steps)
        self.remaining = len(ensemble.spec.steps)
        self.failed = False

    def launch_ready(self) -> None:
        e = self.ensemble
        for i, step in enumerate(e.spec.steps):
            if self.started[i] or self.failed:
                continue
            if not all(t in self.tensors for t in e._in_maps[i].values()):
                continue
            self.started[i] = True
            feeds = {m_in: self.tensors[t] for m_in, t in e._in_maps[i].items()}
            label = f"ensemble '{e.name}' step {i + 1} (model '{step.model}')"
            err = e._member_request(step.model, step.version, feeds, self.request,
                                    functools.partial(self.step_done, i, label), label)
            if err is not None:
                self.fail(err)
                return

    def fail(self, err: OutpostError) -> None:
        if not self.failed:
            self.failed = True
            self.ensemble._finish(self.request, None, err)

    def step_done(self, i: int, label: str, outputs, error) -> None:
        if self.failed:
            return
        if error is not None:
            self.fail(_wrap(error, label))
            return
        for m_out, t in self.ensemble._out_maps[i].items():
            self.tensors[t] = outputs[m_out]
        self.remaining -= 1
        if self.remaining == 0:
            self.ensemble._finish(self.request, {n: self.tensors[n]
                                                 for n in self.ensemble.output_names}, None)
        else:
            self.launch_ready()


def combine(kind: str, arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Combine members' scores: elementwise mean, weighted mean, or a per-row majority vote
    over each member's top class (weighted; a tie goes to the lowest class index)."""
    stack = np.stack(arrays)
    if kind == "mean":
        return stack.mean(axis=0).astype(arrays[0].dtype)
    w = np.asarray(weights, dtype=np.float64)
    if kind == "weighted_mean":
        out = np.tensordot(w / w.sum(), stack.astype(np.float64), axes=1)
        return out.astype(arrays[0].dtype)
    votes = np.argmax(stack, axis=-1)  # [members, ...rows]
    classes = stack.shape[-1]
    tally = np.zeros(votes.shape[1:] + (classes,), dtype=np.float64)
    for member_votes, weight in zip(votes, w):
        np.put_along_axis(tally, member_votes[..., None],
                          np.take_along_axis(tally, member_votes[..., None], -1) + weight, -1)
    return np.argmax(tally, axis=-1).astype(np.int64)


def _wrap(error: OutpostError, label: str) -> OutpostError:
    return error_from_wire({"code": error.code, "message": f"{label}: {error.message}"})
