"""The embedded demo: its models (models.py, a leaf: numpy and onnx only), a real server
process (launcher.py) and the closed-loop workload `outpost demo` drives (workload.py).

May import: appliance.client, appliance.paths, appliance.errors.
"""
