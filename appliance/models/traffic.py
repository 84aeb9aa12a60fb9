"""Traffic policies: which version answers a request, and which one shadows it.

A policy is plain data checked in one place (``TrafficPolicy.check``); ``pick`` is a pure
function of the policy and the request's routing key; ``ShadowStats`` compares a shadow's
outputs with the live ones. Nothing here runs a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.errors import InvalidArgument

FRACTION_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Variant:
    version: int
    fraction: float


@dataclass(frozen=True)
class TrafficPolicy:
    """A canary or A/B split over versions, and an optional shadow version.

    ``split`` empty: the active version answers everything. ``sticky``: a request's
    ``routing_key`` picks its variant, so one key always lands on the same version.
    """

    split: tuple[Variant, ...] = ()
    sticky: bool = False
    shadow: int | None = None
    shadow_timeout_ms: int = 1000
    shadow_sample: float = 1.0  # share of live requests copied to the shadow

    def check(self, model: str = "this model") -> None:
        if self.split:
            versions = [v.version for v in self.split]
            if len(set(versions)) != len(versions):
                raise InvalidArgument(f"traffic split of '{model}' names a version twice: "
                                      f"{versions}")
            for v in self.split:
                if not 0.0 < v.fraction <= 1.0:
                    raise InvalidArgument(
                        f"traffic split of '{model}': version {v.version} has fraction "
                        f"{v.fraction}; each fraction must lie in (0, 1]")
            total = sum(v.fraction for v in self.split)
            if abs(total - 1.0) > FRACTION_TOLERANCE:
                raise InvalidArgument(
                    f"traffic split of '{model}' adds up to {total:g}, not 1: "
                    + ", ".join(f"{v.version}={v.fraction:g}" for v in self.split))
        if self.shadow is not None and self.shadow in {v.version for v in self.split}:
            raise InvalidArgument(f"version {self.shadow} of '{model}' can't both take live "
                                  f"traffic and shadow it")
        if self.shadow_timeout_ms < 1:
            raise InvalidArgument("shadow_timeout_ms must be >= 1")
        if not 0.0 < self.shadow_sample <= 1.0:
            raise InvalidArgument(f"shadow_sample {self.shadow_sample:g} must be a share in "
                                  f"(0, 1] of live requests to copy")

    def versions(self) -> set[int]:
        out = {v.version for v in self.split}
        if self.shadow is not None:
            out.add(self.shadow)
        return out

    def as_dict(self) -> dict:
        return {"split": [{"version": v.version, "fraction": v.fraction} for v in self.split],
                "sticky": self.sticky, "shadow": self.shadow,
                "shadow_timeout_ms": self.shadow_timeout_ms,
                "shadow_sample": self.shadow_sample}

    @classmethod
    def from_dict(cls, data: dict, model: str) -> TrafficPolicy:
        if not isinstance(data, dict):
            raise InvalidArgument("traffic policy must be a map")
        unknown = set(data) - {"split", "sticky", "shadow", "shadow_timeout_ms",
                               "shadow_sample"}
        if unknown:
            raise InvalidArgument(f"unknown traffic field '{sorted(unknown)[0]}'; allowed: "
                                  f"split, sticky, shadow, shadow_timeout_ms, shadow_sample")
        split = data.get("split") or []
        if not isinstance(split, list):
            raise InvalidArgument("'split' must be a list of {version, fraction}")
        variants = []
        for item in split:
            if not isinstance(item, dict) or type(item.get("version")) is not int or \
                    not isinstance(item.get("fraction"), (int, float)) or \
                    isinstance(item.get("fraction"), bool):
                raise InvalidArgument(
                    f"each split entry needs an integer 'version' and a numeric 'fraction', "
                    f"got {item!r}")
            variants.append(Variant(item["version"], float(item["fraction"])))
        shadow = data.get("shadow")
        if shadow is not None and type(shadow) is not int:
            raise InvalidArgument(f"'shadow' must be a version number, got {shadow!r}")
        sticky = data.get("sticky", False)
        timeout = data.get("shadow_timeout_ms", 1000)
        if not isinstance(sticky, bool) or type(timeout) is not int:
            raise InvalidArgument("'sticky' must be true/false and 'shadow_timeout_ms' an "
                                  "integer")
        sample = data.get("shadow_sample", 1.0)
        if not isinstance(sample, (int, float)) or isinstance(sample, bool):
            raise InvalidArgument(f"'shadow_sample' must be a number in (0, 1], got "
                                  f"{sample!r}")
        policy = cls(tuple(variants), sticky, shadow, timeout, float(sample))
        policy.check(model)
        return policy
