"""The v1 wire format, shared by the socket server and the clients: frames and msgpack
maps (frames.py), tensors (tensors.py). Bytes and maps, nothing of models.

May import: appliance.errors.
"""
