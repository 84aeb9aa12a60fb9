"""The Open Inference Protocol v2 (KServe v2 / Triton) over HTTP: docs/http.md.

Served by aiohttp in the socket server's process and event loop, through the same
``Service``, models and batchers. ``codec`` knows the v2 JSON and binary tensor formats;
``routes`` maps requests to the service; ``control`` loads and unloads models;
``server`` owns the aiohttp app, its limits and its lifecycle.
"""

from appliance.http.server import HttpServer

__all__ = ["HttpServer"]
