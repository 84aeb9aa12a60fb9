"""The Open Inference Protocol v2 (KServe v2 / Triton) over HTTP: docs/http.md.

Served by aiohttp in the socket server's process and event loop, through the same
``Service``. ``codec`` knows the v2 JSON and binary tensor formats; ``routes`` maps
requests to the service; ``control`` loads and unloads models; ``metrics`` renders
/metrics; ``server`` owns the aiohttp app, its limits and its lifecycle.
"""
