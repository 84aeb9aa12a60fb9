"""OTA: the fleet side (publish, roll out) and the device agent."""
