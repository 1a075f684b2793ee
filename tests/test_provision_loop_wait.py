"""A provision batch of UDP machines never waits for the event loop that carries tunnelled
traffic; one with a tunnel machine does (the hub is the loop's). Real parts: a Provisioner on a
real SQLite registry, a real wireguard-go device in a namespace of this test, a real tunnel hub
on a loop in its own thread. The loop is held busy for HOLD_S, as a turn of it is while a
thousand gRPC calls arrive at once (tens of ms there; longer here), and each batch is judged by
whether its answers came before the loop was free again: no timing threshold."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from gatekeeper.lab.netns import Lab

pytestmark = pytest.mark.netns

HOLD_S = 2.0

SCRIPT = """
import asyncio, ipaddress, json, sys, tempfile, threading, time, uuid
from pathlib import Path
from gatekeeper.server.provisioning import ProvisionInput, Provisioner
from gatekeeper.server.sqlite_registry import SqliteRegistry
from gatekeeper.server.tokens import TokenPolicy
from gatekeeper.tunnel.peers import TunnelMode
from gatekeeper.tunnel.server import TunnelHub
from gatekeeper.wireguard.keys import PrivateKey
from gatekeeper.wireguard.userspace import UserspaceBackend

hold = float(sys.argv[2])
backend = UserspaceBackend()
backend.die_with_parent = True  # a failing script leaves no wireguard-go behind
with tempfile.TemporaryDirectory() as state:
    registry = SqliteRegistry(Path(state))
    device = backend.create(sys.argv[1])
    try:
        server_key = PrivateKey.generate()
        device.configure(server_key, 51820, [], replace_peers=True)
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

        async def make_hub():
            return TunnelHub(device.listen_port())

        hub = asyncio.run_coroutine_threadsafe(make_hub(), loop).result()
        provisioner = Provisioner(
            registry=registry, device=device,
            prefix=ipaddress.IPv6Network("fdae:41e4:649b:9303::/64"),
            server_public_key=server_key.public_key(), endpoints=["[2001:db8::1]:51820"],
            tokens=TokenPolicy("t", registry.token, registry.tokens, time.time),
            tunnel_mode=TunnelMode.ALLOW, tunnels=hub, tunnel_secret=b"s" * 32, instance="a",
        )
        provisioner.loop = loop

        def hold_loop():
            held = threading.Event()
            freed = []

            def busy():
                held.set()
                time.sleep(hold)
                freed.append(time.monotonic())

            loop.call_soon_threadsafe(busy)
            held.wait(10)  # the loop is busy from now on
            return freed

        def timed(reqs):
            freed = hold_loop()
            out = provisioner.provision_batch(reqs)
            ended = time.monotonic()
            while not freed:
                time.sleep(0.01)
            # Answered while the loop was still busy, or only after it was free.
            return ended < freed[0], [getattr(o, "grpc_peer_addr_port", repr(o)) for o in out]

        def request(node, key, tunnel):
            return ProvisionInput(node_uuid=node, node_public_key=key, join_token="t",
                                  wants_tunnel=tunnel, peer="ipv6:[::1]:1")

        def new_key():
            return PrivateKey.generate().public_key().base64()

        udp_early, udp = timed([request(str(uuid.uuid4()), new_key(), False) for _ in range(20)])
        node, key = str(uuid.uuid4()), new_key()
        tunnel_early, tunnel = timed([request(node, key, True)])
        allowed = len(hub.allowed())
        # The same machine back on UDP: its name and relay must leave the hub (the loop's).
        back_early, back = timed([request(node, key, False)])
        allowed_after = len(hub.allowed())
    finally:
        device.close()
        registry.close()
print(json.dumps({"udp_early": udp_early, "udp": udp, "tunnel_early": tunnel_early,
                  "tunnel": tunnel, "allowed": allowed, "back_early": back_early, "back": back,
                  "allowed_after": allowed_after}))
"""


def test_a_udp_batch_does_not_wait_for_a_busy_loop_and_a_tunnel_batch_does(lab: Lab) -> None:
    ns = lab.namespace("pl")
    ifname = f"gk{lab.lab_id}pl"
    done = subprocess.run(
        ns.exec_argv([sys.executable, "-c", SCRIPT, ifname, str(HOLD_S)]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    # Twenty machines on UDP: answered (no tunnel name) while the loop was still busy.
    assert got["udp"] == [""] * 20
    assert got["udp_early"], got
    # A tunnel machine's relay is the hub's, on the loop: its batch waits for the loop.
    (virtual,) = got["tunnel"]
    assert re.fullmatch(r"\[[0-9a-f:]+\]:\d+", virtual), virtual
    assert not got["tunnel_early"] and got["allowed"] == 1, got
    # Leaving the tunnel is the loop's work too: it waits, and the hub lets the name go.
    assert got["back"] == [""] and not got["back_early"], got
    assert got["allowed_after"] == 0, got
