"""WireGuard: keys, the device backend interface and its backends (wireguard-go, kernel)."""
