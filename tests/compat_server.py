"""A minimal SideroLink server for the compatibility test, run inside the server namespace.

Its Provision answers come from `wirecompat` (messages built from field numbers, not the
project's generated code); its WireGuard side is a real wireguard-go device. It prints one JSON
line when ready, then one line per Provision request it receives (as the machine sent it), and
makes the latest requester's key its peer.

    python compat_server.py LISTEN_ADDR IFNAME WG_PORT ENDPOINT...   (endpoints in wire order)
"""

from __future__ import annotations

import ipaddress
import json
import sys
import threading
import time

import wirecompat

from gatekeeper.wireguard.backend import PeerConfig
from gatekeeper.wireguard.keys import PrivateKey, PublicKey
from gatekeeper.wireguard.userspace import UserspaceBackend

SERVER = ipaddress.IPv6Interface("fdae:41e4:649b:9303::1/64")
NODE = "fdae:41e4:649b:9303:aaaa:bbbb:cccc:dddd/64"


def main() -> None:
    listen, ifname, port, *wire_endpoints = sys.argv[1:]
    key = PrivateKey.generate()
    with UserspaceBackend().create(ifname) as device:
        device.configure(key, int(port), [])
        device.set_addresses([SERVER])
        with wirecompat.MinimalProvisionServer(
            listen,
            server_endpoint=wire_endpoints,
            server_public_key=key.public_key().base64(),
            node_address_prefix=NODE,
            server_address=str(SERVER.ip),
        ) as server:
            print(json.dumps({"ready": True}), flush=True)
            done = threading.Event()
            # Run until the test closes our stdin.

            def wait_for_eof() -> None:
                sys.stdin.read()
                done.set()

            threading.Thread(target=wait_for_eof, daemon=True).start()
            seen = 0
            while not done.is_set():
                if len(server.requests) == seen:
                    time.sleep(0.05)
                    continue
                request = server.requests[seen]
                seen += 1
                device.set_peer(
                    PeerConfig(
                        public_key=PublicKey.from_base64(request["node_public_key"]),
                        allowed_ips=(ipaddress.IPv6Network(NODE.split("/")[0] + "/128"),),
                    ),
                )
                print(json.dumps({"request": request}), flush=True)


if __name__ == "__main__":
    main()
