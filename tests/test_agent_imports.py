"""The machine agent shares the CLI's entry point: what it imports must exist on a machine.

A Talos-like machine image carries the agent's dependencies, not the server's PostgreSQL
client (psycopg needs libpq): importing the CLI must not pull it in. The VM test caught
this once (the agent died at import in the guest).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_the_agent_entry_point_imports_no_postgresql_client() -> None:
    probe = (
        "import sys\n"
        "import gatekeeper.cli.main, gatekeeper.agent.daemon\n"
        "found = [m for m in sys.modules if m.startswith(('psycopg', 'gatekeeper.server.pg'))]\n"
        "print(','.join(sorted(found)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == ""


# Imported by the agent's entry path only if someone re-adds an eager import: pyroute2 (a
# netlink library, ~25 MB; the product speaks netlink itself), cryptography (its extension
# ~11 MB; keys and the certificate go through libcrypto), the server and its PostgreSQL
# client, the CLI's fleet and firewall commands. Loaded only when needed, as each costs
# tenths of a second of start-up in the VM guest: PyYAML (no document to read), the tunnel
# relay (no tunnel asked for), the firewall listing (no table found in the kernel to compare).
NOT_IN_THE_AGENT = (
    "pyroute2",
    "cryptography",
    "yaml",
    "gatekeeper.tunnel.client",
    "gatekeeper.firewall.listing",
    "psycopg",
    "prometheus_client",
    "gatekeeper.server",
    "gatekeeper.wireguard.kernel",
    "gatekeeper.cli.firewall",
    "gatekeeper.cli.machines",
    "gatekeeper.cli.token",
    "gatekeeper.cli.joinconfig",
    "gatekeeper.cli.maint",
)

_RUNNING_AGENT = """
import os, sys, threading, time
from gatekeeper.cli.main import main
from gatekeeper.wireguard.select import select_backend

args, status = sys.argv[1:-1], sys.argv[-1]


def report():
    deadline = time.monotonic() + 30
    while not os.path.exists(status) and time.monotonic() < deadline:
        time.sleep(0.05)
    select_backend("userspace")  # what the agent calls once its link is provisioned
    found = sorted(m for m in sys.modules if m.startswith(%r))
    print("started" if os.path.exists(status) else "no status", ",".join(found), flush=True)
    os._exit(0)


threading.Thread(target=report, daemon=True).start()
main(args)  # signal handlers want the main thread
"""


def test_a_running_userspace_agent_loads_only_what_it_uses(tmp_path: Path) -> None:
    """`gatekeeper agent` as a machine starts it, in a namespace of its own (the agent puts a
    firewall in its namespace), pointed at an API that does not answer."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("siderolink.api=grpc://127.0.0.1:9?jointoken=not-a-secret\n")
    status = tmp_path / "run" / "status.json"
    args = [
        "agent",
        "--wireguard-backend=userspace",
        f"--cmdline={cmdline}",
        f"--run-dir={status.parent}",
        f"--state-dir={tmp_path / 'state'}",
        "--node-uuid=6f1a2b3c-0000-4000-8000-000000000001",
        "--network-timeout=0",
    ]
    probe = _RUNNING_AGENT % (NOT_IN_THE_AGENT,)
    ns = f"gk-imp-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        out = subprocess.run(
            [*["ip", "netns", "exec", ns, sys.executable, "-c"], probe, *args, str(status)],
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert out.stdout.split(" ", 1)[0] == "started", out.stdout + out.stderr[-2000:]
    assert out.stdout.split(" ", 1)[1].strip() == "", out.stdout


def test_the_kernel_backend_needs_no_pyroute2_nor_wireguard_go_code() -> None:
    """The VM guest's agent picks the kernel backend: its import must not bring pyroute2
    (seconds under emulation), which is only a test dependency now, nor the userspace
    backend and its UAPI codec."""
    probe = (
        "import sys\n"
        "import gatekeeper.cli.main, gatekeeper.agent.daemon\n"
        "from gatekeeper.wireguard import select\n"
        "backend = select._kernel_backend()\n"
        "unwanted = ('pyroute2', 'gatekeeper.wireguard.userspace', 'gatekeeper.wireguard.uapi')\n"
        "print(backend.name, ','.join(sorted(m for m in sys.modules if m.startswith(unwanted))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "kernel", out.stdout
