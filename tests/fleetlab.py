"""Helpers for the fleet tests: the CLI against a lab server's state, raw Provision batches."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gatekeeper.lab.netns import Namespace
from gatekeeper.lab.siderolink_lab import Machine, SideroLinkLab

TESTS = Path(__file__).parent
# The boot-storm client (many machines' Provisions from one process), shared with bench/.
STORM = TESTS.parent / "bench" / "storm_client.py"

_BATCH = """
import json, sys, grpc
sys.path.insert(0, {tests!r})
import wirecompat
out = []
for args in json.loads(sys.argv[2]):
    try:
        out.append({{"ok": wirecompat.raw_provision(sys.argv[1], **args)}})
    except grpc.RpcError as e:
        out.append({{"code": e.code().name, "details": e.details()}})
print(json.dumps(out))
"""


def provisions(
    machine: Machine | Namespace, target: str, requests: list[dict[str, Any]]
) -> list[Any]:
    """Several Provision calls from inside a machine's namespace (or the one given), in order,
    in one process."""
    ns = machine if isinstance(machine, Namespace) else machine.ns
    done = subprocess.run(
        ns.exec_argv(
            [
                sys.executable,
                "-c",
                _BATCH.format(tests=str(TESTS)),
                target,
                json.dumps(requests),
            ]
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"provision batch failed: {done.stderr.strip()[-2000:]}")
    result: list[Any] = json.loads(done.stdout)
    return result


def gk(
    sl: SideroLinkLab, *args: str, check: bool = True, registry: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """`gatekeeper ARGS --state-dir <the lab server's> [--registry ...]` from the root
    namespace (`registry`: the `registry_args` fixture's options)."""
    done = subprocess.run(
        [sys.executable, "-m", "gatekeeper", *args, "--state-dir", str(sl.state_dir), *registry],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"gatekeeper {' '.join(args)} failed: {done.stderr}")
    return done


def api_target(sl: SideroLinkLab) -> str:
    return f"[{sl.server_underlay}]:8090"


def scrape(sl: SideroLinkLab, port: int) -> str:
    """The server's /metrics, fetched from its namespace (`--metrics-listen` on its underlay)."""
    code = (
        "import sys, urllib.request\n"
        "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
    )
    return sl.server_ns.run(
        [sys.executable, "-c", code, f"http://[{sl.server_underlay}]:{port}/metrics"]
    )
