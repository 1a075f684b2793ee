"""WireGuard over gRPC: the relay that carries datagrams inside CreateStream."""
