"""The machine-side daemon: drives the link lifecycle with real adapters, publishes status."""
