"""The appliance config (schema.py, load.py), TOML reading (settings.py) and the firmware
profiles (profiles.py).

May import: appliance.errors, appliance.paths, appliance.protocol (its frame limit), engines.
"""
