"""What the memory budget evicted, and why: the account the manager keeps per version, so
readiness, `outpost models list`, the stats op and /metrics can say it.

An active version evicted for memory still counts as ready: it loads on its next
request (docs/operations.md, "Memory budget and readiness").
"""

from __future__ import annotations

from dataclasses import dataclass

Key = tuple[str, int]  # (model, version)


@dataclass
class Evictions:
    """One version's evictions: how many, the latest reason, whether it is out now."""

    count: int = 0
    reason: str = ""
    out: bool = False

    def as_dict(self) -> dict:
        return {"evictions": self.count, "evicted": self.out, "eviction_reason": self.reason}


class EvictionLog:
    def __init__(self) -> None:
        self._by_key: dict[Key, Evictions] = {}

    def evicted(self, key: Key, reason: str) -> None:
        e = self._by_key.setdefault(key, Evictions())
        e.count += 1
        e.reason = reason
        e.out = True

    def loaded(self, key: Key) -> None:
        e = self._by_key.get(key)
        if e is not None:
            e.out = False

    def is_out(self, key: Key) -> bool:
        e = self._by_key.get(key)
        return e is not None and e.out

    def keys(self) -> list[Key]:
        return list(self._by_key)

    def of(self, key: Key) -> Evictions:
        return self._by_key.get(key) or Evictions()
