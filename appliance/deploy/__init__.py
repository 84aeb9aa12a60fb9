"""Installing outpost on a device as a systemd service (install.py), from the one unit
file beside it (outpost.service).

May import: appliance.errors, appliance.paths, engines (its durable file writes).
"""
