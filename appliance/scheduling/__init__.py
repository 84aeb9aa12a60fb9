"""Scheduling one model version's requests: the batching decision (policy.py), the queued
request (request.py), the batcher (batcher.py), instances on worker threads (instance.py), the
read window (window.py), holding requests while a version loads (holding.py), and measuring
how a model runs best here: threads, instances, preferred batch (tuning.py).

May import: appliance.observe, appliance.config, appliance.errors, engines.
"""
