"""msgpack: make sure the C extension is frozen. Without it msgpack silently falls back to
its pure-Python codec, several times slower on every frame."""

hiddenimports = ["msgpack._cmsgpack"]
