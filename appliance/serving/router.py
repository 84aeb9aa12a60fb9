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


@dataclass
class ShadowStats:
    """How a shadow version's answers compare with the live ones."""

    compared: int = 0
    top1_agree: int = 0
    top1_total: int = 0
    max_abs_diff: float = 0.0
    sum_max_abs_diff: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    dropped: int = 0  # not sent: the shadow was busy or not ready
    latencies_s: list[float] = field(default_factory=list)

    def compare(self, live: dict[str, np.ndarray], shadow: dict[str, np.ndarray],
                latency_s: float) -> None:
        self._latency(latency_s)
        worst = 0.0
        for name, a in live.items():
            b = shadow.get(name)
            if b is None or b.shape != a.shape:
                self.error("shape_mismatch" if b is not None else "missing_output")
                return
            if a.size:
                diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
                worst = max(worst, float(np.nanmax(diff)) if np.isfinite(diff).any()
                            else float("inf"))
                if a.ndim >= 1 and a.shape[-1] > 1 and np.issubdtype(a.dtype, np.floating):
                    agree = np.argmax(a, axis=-1) == np.argmax(b, axis=-1)
                    self.top1_agree += int(agree.sum())
                    self.top1_total += int(agree.size)
        self.compared += 1
        self.max_abs_diff = max(self.max_abs_diff, worst)
        self.sum_max_abs_diff += worst

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def _latency(self, s: float) -> None:
        self.latencies_s.append(s)
        if len(self.latencies_s) > 4096:
            del self.latencies_s[:2048]

    def snapshot(self) -> dict:
        lat = np.array(self.latencies_s) * 1e3
        return {
            "compared": self.compared,
            "max_abs_diff": self.max_abs_diff,
            "mean_max_abs_diff": self.sum_max_abs_diff / self.compared if self.compared
            else 0.0,
            "top1_agreement": self.top1_agree / self.top1_total if self.top1_total else None,
            "errors": dict(self.errors),
            "dropped": self.dropped,
            "latency_ms": {"p50": float(np.percentile(lat, 50)) if lat.size else 0.0,
                           "p99": float(np.percentile(lat, 99)) if lat.size else 0.0},
        }


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
            try:
                shadow = self.manager.lookup(name, policy.shadow)
            except OutpostError:
                self.shadows.setdefault(name, ShadowStats()).dropped += 1
        return lv, shadow

    def shadow_copy(self, name: str, shadow: ServedVersion, feeds: dict[str, np.ndarray]):
        """Send a copy of a live request to ``shadow``; returns ``on_live(outputs)`` to call
        with the live answer, or None when the copy could not be sent. Nothing the shadow
        does reaches the live request."""
        stats = self.shadows.setdefault(name, ShadowStats())
        if shadow.state is not VersionState.READY:
            stats.dropped += 1
            return None
        policy = self.manager.traffic_policy(name)
        timeout_ms = policy.shadow_timeout_ms if policy is not None else 1000
        pair: dict = {}
        t0 = time.monotonic()

        def maybe_compare() -> None:
            if "live" in pair and "shadow" in pair:
                stats.compare(pair.pop("live"), pair.pop("shadow"), pair.pop("latency"))

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
                maybe_compare()

        try:
            request = shadow.request_from_arrays(feeds, None, t0 + timeout_ms / 1e3,
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
