"""aiohttp: its C speedups (HTTP parser, writer, websocket reader) are imported inside
try/except with a pure-Python fallback; list them so the frozen server keeps them."""

from PyInstaller.utils.hooks import collect_submodules

hiddenimports = collect_submodules(
    "aiohttp", filter=lambda name: name.startswith(("aiohttp._", "aiohttp.web")))
