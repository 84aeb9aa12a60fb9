"""Triton's KServe v2 protocol over gRPC (``inference.GRPCInferenceService``): docs/grpc.md.

Served by grpcio's asyncio server in the socket server's process and event loop, through
the same ``Service``, so tritonclient.grpc and perf_analyzer talk to outpost unchanged.
``proto/inference.proto`` is outpost's own statement of the messages (wire-compatible with
Triton's); ``inference_pb2*.py`` are generated from it by build/gen_grpc_stubs.py and
committed. ``tensors`` turns messages into the service's requests and back; ``errors``
maps outpost's codes to gRPC status codes; ``stream`` runs one ModelStreamInfer call;
``servicer`` answers each RPC; ``server`` owns the gRPC server, its limits and its
lifecycle.
"""
