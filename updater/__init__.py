"""OTA updates: the fleet side (TUF repository, rollouts, fleet server) and the device agent.

Imports ``engines`` and the repository/model API of ``appliance``; nothing imports it
except the CLI and the server's composition in ``appliance/app.py``.
"""
