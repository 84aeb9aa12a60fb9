"""What the appliance tells about itself: per-version figures (stats.py) and structured
logs (logs.py).

May import: appliance.errors, appliance.paths.
"""
