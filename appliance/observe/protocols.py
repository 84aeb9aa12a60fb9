"""Infer requests answered per transport (socket, http, grpc) and outcome: which door the
load comes through, and which one fails. Counted on the event loop, read by /metrics."""

from __future__ import annotations

import collections

OK = "OK"


class ProtocolCounts:
    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def answered(self, protocol: str, code: str = OK) -> None:
        """One infer request of ``protocol`` answered: OK, or the error's code."""
        self.counts[(protocol, code)] += 1
