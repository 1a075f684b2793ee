"""Gatekeeper: SideroLink in Python (machine agent and SideroLink API server)."""

__version__ = "0.1.0"
