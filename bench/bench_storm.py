"""Boot storm: N simulated machines provision at once against a real `gatekeeper server`.

Real X25519 keys, real Provision calls over gRPC on a veth underlay, the server adding a real
peer per machine to its wireguard-go device and committing each claim (synchronous=FULL)
before answering. Prints total time, throughput and latency percentiles as JSON.

    sudo python bench/bench_storm.py [--count 1000] [--concurrency 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from gatekeeper.lab.siderolink_lab import SideroLinkLab

STORM = Path(__file__).parent / "storm_client.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=8)
    args = parser.parse_args()
    with SideroLinkLab() as sl:
        sl.start_server()
        client = sl.add_machine(start=False)
        done = subprocess.run(
            client.ns.exec_argv(
                [
                    sys.executable, str(STORM), f"[{sl.server_underlay}]:8090",
                    "--count", str(args.count), "--concurrency", str(args.concurrency),
                    "--channels", str(args.channels), "--token", sl.join_token,
                ]
            ),
            capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
        summary = json.loads(done.stdout)
        summary["server_peers"] = len(sl.server_peers())
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
