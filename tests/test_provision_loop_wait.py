"""A provision batch of UDP machines never waits for the event loop that carries tunnelled
traffic; one with a tunnel machine does (the hub is the loop's). Real parts: a Provisioner on a
real SQLite registry, a real wireguard-go device in a namespace of this test, a real tunnel hub
on a loop in its own thread. The loop is held busy for HOLD_S, as a turn of it is while a
thousand gRPC calls arrive at once (tens of ms there; longer here), and each batch is judged by
whether its answers came before the loop was free again: no timing threshold."""

from __future__ import annotations

import re

import pytest
from hub_rig import run_script

from gatekeeper.lab.netns import Lab

pytestmark = pytest.mark.netns

HOLD_S = 2.0

SCRIPT = """
import json, tempfile, threading, time
import hub_rig

hold = float(sys.argv[3])
with tempfile.TemporaryDirectory() as state:
    registry = hub_rig.sqlite_registry(state)
    try:
        with hub_rig.rig(sys.argv[1], registry, instance="a") as a:
            provisioner, hub, loop = a.provisioner, a.hub, a.loop

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

            udp_early, udp = timed(
                [hub_rig.request(*hub_rig.new_machine(), False) for _ in range(20)]
            )
            node, key = hub_rig.new_machine()
            tunnel_early, tunnel = timed([hub_rig.request(node, key, True)])
            allowed = len(hub.allowed())
            # The same machine back on UDP: its name and relay must leave the hub (the loop's).
            back_early, back = timed([hub_rig.request(node, key, False)])
            allowed_after = len(hub.allowed())
    finally:
        registry.close()
print(json.dumps({"udp_early": udp_early, "udp": udp, "tunnel_early": tunnel_early,
                  "tunnel": tunnel, "allowed": allowed, "back_early": back_early, "back": back,
                  "allowed_after": allowed_after}))
"""


def test_a_udp_batch_does_not_wait_for_a_busy_loop_and_a_tunnel_batch_does(lab: Lab) -> None:
    got = run_script(lab, "pl", SCRIPT, str(HOLD_S))
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
