"""The SideroLink API server: provisioning, overlay addresses, WireGuard peers and the registry."""
