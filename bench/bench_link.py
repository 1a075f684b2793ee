"""Benchmark: agent start -> first handshake, and Provision RPC latency.

Real parts in a throwaway lab (server and machine namespaces, wireguard-go, gRPC over veth).
Prints figures; asserts nothing.  Run as root: `python bench/bench_link.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from gatekeeper.lab.siderolink_lab import SideroLinkLab

PROVISION_LOOP = r"""
import json, statistics, sys, time, grpc
from gatekeeper.pb.siderolink import provision_pb2, provision_pb2_grpc
from gatekeeper.wireguard.keys import PrivateKey
target, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
channel = grpc.insecure_channel(target)
stub = provision_pb2_grpc.ProvisionServiceStub(channel)
times = []
for i in range(n):
    req = provision_pb2.ProvisionRequest(
        node_uuid=f"00000000-0000-0000-0000-{i:012d}",
        node_public_key=PrivateKey.generate().public_key().base64(),
        join_token=token, node_unique_token="")
    t = time.perf_counter()
    stub.Provision(req, timeout=10)
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="agent starts to time")
    parser.add_argument("--provisions", type=int, default=200, help="Provision calls to time")
    args = parser.parse_args()
    with SideroLinkLab() as lab:
        lab.start_server()
        machine = lab.add_machine(start=False)
        link_up = []
        for _ in range(args.runs):
            (machine.run_dir / "status.json").unlink(missing_ok=True)
            started = time.monotonic()
            lab.start_agent(machine)
            lab.wait_connected(machine, timeout=30)
            link_up.append(time.monotonic() - started)
            lab.stop_agent(machine)
        out = subprocess.run(
            machine.ns.exec_argv(
                [
                    sys.executable,
                    "-c",
                    PROVISION_LOOP,
                    f"[{lab.server_underlay}]:8090",
                    lab.join_token,
                    str(args.provisions),
                ]
            ),
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        rpc = sorted(json.loads(out.stdout))
    print(f"agent start -> first handshake (process start included), {args.runs} runs:")
    print(
        f"  median {statistics.median(link_up):.3f} s, min {min(link_up):.3f} s, "
        f"max {max(link_up):.3f} s"
    )
    p50 = rpc[len(rpc) // 2] * 1000
    p99 = rpc[min(len(rpc) - 1, int(len(rpc) * 0.99))] * 1000
    print(f"Provision RPC over the veth, {len(rpc)} calls (new machine each, real peer added):")
    print(f"  p50 {p50:.2f} ms, p99 {p99:.2f} ms, mean {statistics.mean(rpc) * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
