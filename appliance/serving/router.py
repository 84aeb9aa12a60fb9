"""The router: which version answers a request (the active one, or a traffic split's
pick), and the shadow copies compared against the live answers.

``pick`` is a pure function of the policy and the request's routing key; ``ShadowStats``
compares a shadow's outputs with the live ones. What should be loaded and which version
is active is the model manager's; the router only reads it."""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field

import numpy as np

from appliance.errors import InvalidArgument, NotFound, OutpostError, ResourceExhausted
from appliance.models.manager import NOT_SERVING, ModelManager
from appliance.models.traffic import TrafficPolicy
from appliance.models.versions import ServedVersion, VersionState
from appliance.serving.fields import model_name, version_number


def key_unit(key: str) -> float:
    """A routing key as a stable number in [0, 1)."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick(policy: TrafficPolicy, routing_key: str | None, rng: random.Random) -> int | None:
    """The version a request goes to under ``policy``; None: the active version."""
    if not policy.split:
        return None
    u = key_unit(routing_key) if (policy.sticky and routing_key is not None) else rng.random()
    acc = 0.0
    for v in policy.split:
        acc += v.fraction
        if u < acc:
            return v.version
    return policy.split[-1].version


def is_distribution(a: np.ndarray) -> bool:
    """Classifier-like: a float output whose rows are probability distributions (in
    [0, 1], summing to 1), as a softmax head gives. Its answers agree on the top class."""
    if a.dtype.kind != "f" or a.ndim < 1 or a.shape[-1] < 2 or not a.size:
        return False
    if not np.all(np.isfinite(a)) or a.min() < 0.0 or a.max() > 1.0:
        return False
    return bool(np.allclose(a.sum(axis=-1, dtype=np.float64), 1.0, atol=1e-3))


def answers_agree(live: np.ndarray, shadow: np.ndarray, rtol: float, atol: float) -> bool:
    """One output of one request: the same top class in every row for a classifier-like
    output, else every element within the tolerances (NaN never agrees)."""
    if is_distribution(live):
        if shadow.dtype.kind != "f" or not np.all(np.isfinite(shadow)):
            return False
        return bool(np.all(np.argmax(live, axis=-1) == np.argmax(shadow, axis=-1)))
    try:
        return bool(np.allclose(live, shadow, rtol=rtol, atol=atol))
    except TypeError:  # non-numeric outputs: only equality counts
        return bool(np.array_equal(live, shadow))


RECENT = 4096  # latencies kept per series: the recent ones are what a judgement needs


@dataclass
class ShadowStats:
    """How a shadow version's answers compare with the live ones."""

    compared: int = 0
    agreed: int = 0  # requests answered alike (answers_agree on every output)
    top1_agree: int = 0
    top1_total: int = 0
    max_abs_diff: float = 0.0
    sum_max_abs_diff: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    dropped: int = 0  # not sent: the shadow was busy, not ready, or shed
    shed: int = 0  # of those, not sent because live traffic needed the device
    sampled_out: int = 0  # not copied: outside the policy's shadow_sample
    busy_seen: int = 0  # copies considered while live requests waited for the device
    latencies_s: list[float] = field(default_factory=list)
    live_latencies_s: list[float] = field(default_factory=list)  # the same requests, live

    def compare(self, live: dict[str, np.ndarray], shadow: dict[str, np.ndarray],
                latency_s: float, live_latency_s: float | None = None,
                rtol: float = 1e-3, atol: float = 1e-4) -> None:
        _recent(self.latencies_s, latency_s)
        if live_latency_s is not None:
            _recent(self.live_latencies_s, live_latency_s)
        worst = 0.0
        agree = True
        for name, a in live.items():
            b = shadow.get(name)
            if b is None or b.shape != a.shape:
                self.error("shape_mismatch" if b is not None else "missing_output")
                return
            if a.size:
                agree = agree and answers_agree(a, b, rtol, atol)
                diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
                worst = max(worst, float(np.nanmax(diff)) if np.isfinite(diff).any()
                            else float("inf"))
                if a.ndim >= 1 and a.shape[-1] > 1 and np.issubdtype(a.dtype, np.floating):
                    top = np.argmax(a, axis=-1) == np.argmax(b, axis=-1)
                    self.top1_agree += int(top.sum())
                    self.top1_total += int(top.size)
        self.compared += 1
        self.agreed += agree
        self.max_abs_diff = max(self.max_abs_diff, worst)
        self.sum_max_abs_diff += worst

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def snapshot(self) -> dict:
        return {
            "compared": self.compared,
            "agreed": self.agreed,
            "max_abs_diff": self.max_abs_diff,
            "mean_max_abs_diff": self.sum_max_abs_diff / self.compared if self.compared
            else 0.0,
            "top1_agreement": self.top1_agree / self.top1_total if self.top1_total else None,
            "errors": dict(self.errors),
            "dropped": self.dropped,
            "shed": self.shed,
            "sampled_out": self.sampled_out,
            "latency_ms": _percentiles(self.latencies_s),
            "live_latency_ms": _percentiles(self.live_latencies_s),
        }


def _recent(series: list[float], value: float) -> None:
    series.append(value)
    if len(series) > RECENT:
        del series[:RECENT // 2]


def _percentiles(series: list[float]) -> dict:
    lat = np.array(series) * 1e3
    return {"p50": float(np.percentile(lat, 50)) if lat.size else 0.0,
            "p99": float(np.percentile(lat, 99)) if lat.size else 0.0}


# While live requests wait for the device, one copy in this many goes: the shadow adds at
# most ~5% work to a saturated device (its p99 rises about as much), and still progresses.
BUSY_COPY_EVERY = 20


def shed_copy(live_waiting_rows: int, shadow_inflight: int, shadow_capacity: int,
              busy_seen: int) -> bool:
    """Live traffic first: shed the copy while the shadow still holds as many copies as
    it runs at once, and, while a live request waits for the device (the live version is
    behind), all but one in BUSY_COPY_EVERY (``busy_seen``: copies considered while
    behind, this one included)."""
    if shadow_inflight >= shadow_capacity:
        return True
    return live_waiting_rows > 0 and busy_seen % BUSY_COPY_EVERY != 0


def waiting_rows(version: ServedVersion) -> int:
    """Rows queued at a version and not yet running (0 for one without a batcher)."""
    batcher = getattr(version, "batcher", None)
    return batcher.queued_rows if batcher is not None else 0


def _rows(version: ServedVersion, feeds: dict[str, np.ndarray]) -> int:
    if not version.max_batch_size or not feeds:
        return 1
    return int(next(iter(feeds.values())).shape[0])


def run_capacity(version: ServedVersion) -> int:
    """Requests a version can run at once: a full batch on each instance."""
    return max(version.max_batch_size, 1) * max(getattr(version, "instance_count", 1), 1)


class Router:
    """Routing state of the models a manager serves: per model, the requests routed to
    each version and the shadow's comparison figures (reset when the policy changes)."""

    def __init__(self, manager: ModelManager):
        self.manager = manager
        self.routed: dict[str, dict[int, int]] = {}
        self.shadows: dict[str, ShadowStats] = {}
        self._rng = random.Random()

    def route(self, name: object, version: object, routing_key: object
              ) -> tuple[ServedVersion, ServedVersion | None]:
        """The version that answers a request, and the version that shadows it (or None)."""
        if type(name) is not str:
            name = model_name(name)  # raises, unless a str subclass
        if version is not None:
            version = version_number(version)
        if routing_key is not None and not isinstance(routing_key, str):
            raise InvalidArgument("'routing_key' must be a string")
        active = self.manager.active.get(name)
        if active is None:
            model_name(name)  # an empty name gets its own error
            raise NotFound(f"model '{name}' is not served here; the 'models' op lists what is")
        policy = self.manager.traffic_policy(name)
        if version is None:
            version = active if policy is None else (
                pick(policy, routing_key, self._rng) or active)
        lv = self.manager.loaded.get((name, version))
        if lv is None or lv.state in NOT_SERVING:
            lv = self.manager.lookup(name, version)
        counts = self.routed.setdefault(name, {})
        counts[version] = counts.get(version, 0) + 1
        shadow = None
        if policy is not None and policy.shadow is not None and policy.shadow != version:
            if policy.shadow_sample < 1.0 and self._rng.random() >= policy.shadow_sample:
                self.shadows.setdefault(name, ShadowStats()).sampled_out += 1
                return lv, None
            try:
                shadow = self.manager.lookup(name, policy.shadow)
            except OutpostError:
                self.shadows.setdefault(name, ShadowStats()).dropped += 1
        return lv, shadow

    def shadow_copy(self, name: str, shadow: ServedVersion, feeds: dict[str, np.ndarray],
                    live: ServedVersion | None = None):
        """Send a copy of a live request to ``shadow``; returns ``on_live(outputs)`` to call
        with the live answer, or None when the copy could not be sent. Nothing the shadow
        does reaches the live request.

        Copies come last: they go at the shadow's lowest priority level, and are shed
        (counted in ``shed``) while ``live`` (the version answering) is behind or the
        shadow is still busy with earlier copies (``shed_copy``)."""
        stats = self.shadows.setdefault(name, ShadowStats())
        if shadow.state is not VersionState.READY:
            stats.dropped += 1
            return None
        # Rows waiting at the live version besides this request's own (just queued).
        behind = max(waiting_rows(live) - _rows(live, feeds), 0) if live is not None else 0
        stats.busy_seen += behind > 0
        if shed_copy(behind, shadow.inflight_count(), run_capacity(shadow),
                     stats.busy_seen):
            stats.dropped += 1
            stats.shed += 1
            return None
        policy = self.manager.traffic_policy(name)
        timeout_ms = policy.shadow_timeout_ms if policy is not None else 1000
        validation = getattr(shadow.config, "validation", None)
        rtol = validation.rtol if validation is not None else 1e-3
        atol = validation.atol if validation is not None else 1e-4
        pair: dict = {}
        t0 = time.monotonic()

        def maybe_compare() -> None:
            if "live" in pair and "shadow" in pair:
                stats.compare(pair.pop("live"), pair.pop("shadow"), pair.pop("latency"),
                              pair.pop("live_latency"), rtol, atol)

        def on_shadow(outputs, error) -> None:
            if error is not None:
                stats.error(error.code)
                pair.clear()
                pair["failed"] = True
                return
            pair["shadow"] = outputs
            pair["latency"] = time.monotonic() - t0
            maybe_compare()

        def on_live(outputs) -> None:
            if not pair.get("failed"):
                pair["live"] = outputs
                pair["live_latency"] = time.monotonic() - t0
                maybe_compare()

        try:
            lowest = shadow.config.dynamic_batching.priority_levels - 1
            request = shadow.request_from_arrays(feeds, lowest, t0 + timeout_ms / 1e3,
                                                 on_shadow)
            shadow.submit(request)
        except ResourceExhausted:
            stats.dropped += 1
            return None
        except OutpostError as exc:
            stats.error(exc.code)
            return None
        return on_live

    def reset(self, name: str) -> None:
        """A new traffic policy for ``name``: its figures start again."""
        self.routed.pop(name, None)
        self.shadows.pop(name, None)

    def snapshot(self, name: str) -> dict | None:
        policy = self.manager.traffic_policy(name)
        shadow = self.shadows.get(name)
        if policy is None and not self.routed.get(name) and shadow is None:
            return None
        return {"policy": policy.as_dict() if policy else None,
                "routed": {str(v): n for v, n in sorted(self.routed.get(name, {}).items())},
                "shadow": shadow.snapshot() if shadow else None}
