"""A Provisioner on real parts for scripts that run inside a test's namespace: a real SQLite
registry, a real wireguard-go device, and (optionally) a real tunnel hub on an event loop in
its own thread, as the server has it. Several rigs may share one registry, as instances of
one fleet share their store."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatekeeper.lab.netns import Lab
from gatekeeper.server.provisioning import Provisioner, ProvisionInput
from gatekeeper.server.registry import Registry
from gatekeeper.server.sqlite_registry import SqliteRegistry
from gatekeeper.server.tokens import TokenPolicy
from gatekeeper.tunnel.peers import TunnelMode
from gatekeeper.tunnel.server import TunnelHub
from gatekeeper.wireguard.keys import PrivateKey
from gatekeeper.wireguard.userspace import UserspaceBackend

TOKEN = "t"
PREFIX = ipaddress.IPv6Network("fdae:41e4:649b:9303::/64")


@dataclass
class Rig:
    provisioner: Provisioner
    hub: TunnelHub | None
    loop: asyncio.AbstractEventLoop


@contextmanager
def rig(ifname: str, registry: Registry, *, instance: str, tunnel: bool = True) -> Iterator[Rig]:
    """One instance: `tunnel` gives it a hub (tunnel mode "allow"), else it has none (off)."""
    backend = UserspaceBackend()
    backend.die_with_parent = True  # a failing script leaves no wireguard-go behind
    device = backend.create(ifname)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        server_key = PrivateKey.generate()
        device.configure(server_key, 0, [], replace_peers=True)
        hub = None
        if tunnel:

            async def make_hub() -> TunnelHub:
                return TunnelHub(device.listen_port())

            hub = asyncio.run_coroutine_threadsafe(make_hub(), loop).result()
        provisioner = Provisioner(
            registry=registry,
            device=device,
            prefix=PREFIX,
            server_public_key=server_key.public_key(),
            endpoints=["[2001:db8::1]:51820"],
            tokens=TokenPolicy(TOKEN, registry.token, registry.tokens, time.time),
            tunnel_mode=TunnelMode.ALLOW,
            tunnels=hub,
            tunnel_secret=b"s" * 32,
            instance=instance,
        )
        provisioner.loop = loop
        yield Rig(provisioner, hub, loop)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        device.close()


def request(node: str, key: str, tunnel: bool) -> ProvisionInput:
    return ProvisionInput(
        node_uuid=node,
        node_public_key=key,
        join_token=TOKEN,
        wants_tunnel=tunnel,
        peer="ipv6:[::1]:1",
    )


def new_machine() -> tuple[str, str]:
    """A node UUID and a fresh public key."""
    return str(uuid.uuid4()), new_key()


def new_key() -> str:
    return PrivateKey.generate().public_key().base64()


def sqlite_registry(state: str) -> Registry:
    return SqliteRegistry(Path(state))


RIG = Path(__file__).parent


def run_script(lab: Lab, name: str, script: str, *args: str) -> dict[str, Any]:
    """Run `script` (which may `import hub_rig`) in a new namespace `name` of the lab, with
    `args` after the interface names it may use (`gk<lab><name>0`, `...1`); its last line
    of output, as JSON."""
    ns = lab.namespace(name)
    ifnames = [f"gk{lab.lab_id}{name}{i}" for i in range(2)]
    prelude = f"import sys; sys.path.insert(0, {str(RIG)!r})\n"
    done = subprocess.run(
        ns.exec_argv([sys.executable, "-c", prelude + script, *ifnames, *args]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return out
