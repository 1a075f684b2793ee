"""A machine that leaves an instance's tunnel through another instance and comes back leaves
no relay behind. With several instances, the record a Provision finds in the store may be
another instance's (the machine went to B on UDP) while this instance's hub still holds the
tunnel name it gave the machine, because its reconciler has not run yet. That name's relay
socket must close when the machine is back here, not at the next restart.

Real parts: two Provisioners (instances "a", with a tunnel hub, and "b", without) on one real
SQLite registry, as instances of one fleet share their store; a real wireguard-go device each
in a namespace of this test; a real hub on its own loop. Each case is judged by the names A's
hub admits streams for afterwards, beside a bystander machine on A's tunnel throughout.

(The same sequence through an identity replacement, a machine whose unique token changed, is
not here: it needs a live WireGuard session from the requesting host.)"""

from __future__ import annotations

import pytest
from hub_rig import run_script

from gatekeeper.lab.netns import Lab

pytestmark = pytest.mark.netns

SCRIPT = """
import json, tempfile
import hub_rig

out = {}
with tempfile.TemporaryDirectory() as state:
    registry = hub_rig.sqlite_registry(state)
    try:
        with hub_rig.rig(sys.argv[1], registry, instance="a") as a, \\
                hub_rig.rig(sys.argv[2], registry, instance="b", tunnel=False) as b:

            def provision(rig, node, key, tunnel):
                (got,) = rig.provisioner.provision_batch([hub_rig.request(node, key, tunnel)])
                return got.grpc_peer_addr_port

            # A bystander on A's tunnel throughout: its name must stay.
            out["bystander"] = provision(a, *hub_rig.new_machine(), True)
            # Back on UDP, same key: A must let its name go.
            node, key = hub_rig.new_machine()
            out["tunnel_name"] = provision(a, node, key, True)
            out["on_a"] = a.hub.allowed()
            provision(b, node, key, False)
            provision(a, node, key, False)
            out["back_on_udp"] = a.hub.allowed()
            # Back on the tunnel with a new key (it restarted meanwhile): only the new name.
            node, key = hub_rig.new_machine()
            provision(a, node, key, True)
            key = hub_rig.new_key()
            provision(b, node, key, False)
            out["new_name"] = provision(a, node, key, True)
            out["back_on_tunnel"] = a.hub.allowed()
    finally:
        registry.close()
print(json.dumps(out))
"""


def test_a_machine_back_through_another_instance_leaves_no_relay_behind(lab: Lab) -> None:
    got = run_script(lab, "rh", SCRIPT)
    bystander = got["bystander"]
    assert sorted(got["on_a"]) == sorted([bystander, got["tunnel_name"]]), got
    assert got["back_on_udp"] == [bystander], got
    assert sorted(got["back_on_tunnel"]) == sorted([bystander, got["new_name"]]), got
