"""The machine-side daemon: runs the link lifecycle against real adapters and publishes its status."""
