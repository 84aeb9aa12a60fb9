"""The one seam every transport calls: the typed request and response (contract.py), the
service (service.py) and the router that picks the version answering a request
(router.py).

May import: appliance.models, appliance.scheduling, appliance.config, appliance.observe,
appliance.errors, engines.
"""
