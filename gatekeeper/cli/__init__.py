"""The gatekeeper command line."""
