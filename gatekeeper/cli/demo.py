"""`gatekeeper demo`: the whole SideroLink flow in a throwaway two-namespace lab."""

from __future__ import annotations

import base64
import hashlib
import shutil
import sys
import time
from pathlib import Path

from gatekeeper.lab.netns import LabError, require_root


def _fingerprint(public_key_b64: str) -> str:
    return hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest()[:8]


def run_demo(timeout: float = 30.0, keep_logs: str | None = None) -> int:
    from gatekeeper.lab.siderolink_lab import SideroLinkLab

    try:
        require_root("gatekeeper demo")
        print("building the lab: namespaces 'server' and 'machine' joined by a veth pair ...")
        lab = SideroLinkLab()
    except LabError as exc:
        print(f"gatekeeper demo: {exc}", file=sys.stderr)
        return 2
    try:
        started = time.monotonic()
        lab.start_server()
        print(
            f"server  : namespace {lab.server_ns.name}, gRPC [{lab.server_underlay}]:8090, "
            f"WireGuard {lab.server_wg_interface} port 51820 (join token: <redacted>)"
        )
        machine = lab.add_machine()
        print(
            f"machine : namespace {machine.ns.name}, underlay {machine.underlay}, "
            f"node UUID {machine.node_uuid}"
        )
        print("         siderolink.api=grpc://[...]:8090?jointoken=<redacted> on its command line")
        agent_started = time.monotonic()
        status = lab.wait_connected(machine, timeout=timeout)
        link_up = time.monotonic() - agent_started
        server_address = status["server_address"]
        ok = lab.ping(machine, server_address, count=3, wait=2)
        print()
        print(f"link    : {status['link_name']} up in {link_up:.2f} s (agent start -> handshake)")
        print(
            f"          machine {status['node_address']}  key {_fingerprint(status['public_key'])}"
        )
        print(f"          server  {server_address}  endpoint {status['endpoint']}")
        peers = lab.server_peers()
        print(f"          server's WireGuard peers: {[_fingerprint(p) for p in peers]}")
        print(f"ping    : machine -> server over the overlay: {'ok' if ok else 'FAILED'}")
        print(f"total   : {time.monotonic() - started:.2f} s")
        if not ok:
            print("gatekeeper demo: the overlay ping failed", file=sys.stderr)
            return 1
        print("demo ok; tearing the lab down")
        return 0
    except LabError as exc:
        print(f"gatekeeper demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; tearing the lab down", file=sys.stderr)
        return 130
    finally:
        if keep_logs:
            dest = Path(keep_logs)
            dest.mkdir(parents=True, exist_ok=True)
            for log in lab.workdir.glob("*.log"):
                shutil.copy(log, dest / log.name)
        lab.close()
