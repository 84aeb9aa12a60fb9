"""`outpost update check`: one OTA update pass on this device (the updater package)."""

from __future__ import annotations


def register(sub) -> None:
    from updater.cli import register_update  # noqa: PLC0415

    register_update(sub)
