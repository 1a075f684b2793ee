"""WireGuard: keys, the device backend interface and its backends (userspace wireguard-go, kernel)."""
