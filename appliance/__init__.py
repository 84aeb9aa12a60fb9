"""Outpost: the device-side model server."""

__version__ = "0.1.0"
