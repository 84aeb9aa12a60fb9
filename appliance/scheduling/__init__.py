"""Scheduling one model version's requests: the batching decision (policy.py), the queued
request (request.py), the batcher (batcher.py), instances on worker threads (instance.py), the
read window (window.py), holding requests while a version loads (holding.py) and batch-size
measuring (batch_tuning.py).

May import: appliance.observe, appliance.config, appliance.errors, engines.
"""
