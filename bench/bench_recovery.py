"""Benchmark: link recovery after a server crash, and dead-path detection.

Real parts in a throwaway lab. For each run: SIGKILL the server, start it again, and measure
from the moment it answers gRPC again until (a) the server has a fresh handshake with the
machine and (b) the machine's maintenance API answers over the overlay. No re-provision is
allowed. Then, once, how long the agent takes to report a cut path as down (default timing).
Prints figures; asserts nothing. Run as root: `python bench/bench_recovery.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from gatekeeper.lab.siderolink_lab import SideroLinkLab, latest_handshakes, registry_endpoints


def api_answers(lab: SideroLinkLab, address: str) -> bool:
    argv = [sys.executable, "-m", "gatekeeper", "maint", "version", "-n", address]
    done = subprocess.run(
        lab.server_ns.exec_argv([*argv, "--timeout", "2"]), capture_output=True, check=False
    )
    return done.returncode == 0


def wait(predicate: object, timeout: float) -> float:
    started = time.monotonic()
    while not predicate():  # type: ignore[operator]
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-dead-path", action="store_true")
    args = parser.parse_args()
    handshake, api = [], []
    with SideroLinkLab() as lab:
        lab.start_server()
        machine = lab.add_machine()
        first = lab.wait_connected(machine)
        address = first["node_address"].split("/")[0]
        wait(lambda: api_answers(lab, address), 20)
        wait(lambda: registry_endpoints(lab.state_dir).get(machine.node_uuid), 20)
        for _ in range(args.runs):
            lab.stop_server(kill=True)
            time.sleep(1)  # the machine's session is now with a dead server
            # Any handshake on the new device is a new one; `wg` has one-second resolution.
            back = time.time()
            lab.start_server()
            t0 = time.monotonic()
            wait(
                lambda back=back: (  # type: ignore[misc]
                    latest_handshakes(lab.server_wg_interface).get(first["public_key"], 0)
                    >= int(back)
                ),
                30,
            )
            handshake.append(time.monotonic() - t0)
            wait(lambda: api_answers(lab, address), 30)
            api.append(time.monotonic() - t0)
        provisions = machine.status()["provisions"]
        dead = None
        if not args.skip_dead_path:
            lab.server_ns.run(["ip", "link", "set", "v1", "down"])
            dead = wait(lambda: not machine.status().get("connected"), 120)
    print(f"server SIGKILL + restart, {args.runs} runs (from the server answering gRPC again;")
    print("  0 ms means the handshake was already done by then: peers are restored first):")
    print(
        f"  fresh handshake: median {statistics.median(handshake) * 1000:.0f} ms, "
        f"max {max(handshake) * 1000:.0f} ms"
    )
    print(
        f"  maintenance API answering over the overlay: median {statistics.median(api):.2f} s, "
        f"max {max(api):.2f} s (target <= 5 s median)"
    )
    print(f"  provisions by the machine during all runs: {provisions} (1 = none needed)")
    if dead is not None:
        print(
            f"dead path (cable cut) reported down after {dead:.1f} s (default link timeout 45 s; "
            "Talos: 275 s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
