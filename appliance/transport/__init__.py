"""Wire formats in, wire formats out, and nothing else: the msgpack socket server
(socket_server.py, busy_poll.py) and the Open Inference Protocol over HTTP (http/). Each
decodes and encodes tensors at its own edge and calls only appliance.serving.

May import: appliance.serving (its public face), appliance.protocol, appliance.config,
appliance.observe, appliance.scheduling.window (the read window), appliance.errors.
"""
