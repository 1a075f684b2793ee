"""The machine agent shares the CLI's entry point: what it imports must exist on a machine.

A Talos-like machine image carries the agent's dependencies, not the server's PostgreSQL
client (psycopg needs libpq): importing the CLI must not pull it in. The VM test caught
this once (the agent died at import in the guest).
"""

from __future__ import annotations

import subprocess
import sys


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
