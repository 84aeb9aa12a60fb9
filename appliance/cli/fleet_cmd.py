"""`outpost fleet ...`: the fleet side of OTA updates (the updater package)."""

from __future__ import annotations


def register(sub) -> None:
    from updater.cli import register_fleet  # noqa: PLC0415

    register_fleet(sub)
