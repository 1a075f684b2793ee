"""Scale on kernel WireGuard: one `gatekeeper server` in the QEMU guest holding N peers.

This host has no kernel WireGuard, so `bench_scale.py` measures the server beside wireguard-go,
whose per-peer memory puts the two over the target at 10,000 peers. Here the server runs where the
kernel module is: inside the vm-tests guest (Debian's kernel, `--wireguard-backend kernel`, a
SQLite registry in the guest's /run, or with `--registry postgresql` a real PostgreSQL on the
host that the guest reaches over the lab bridge), as a real fleet would run it. The host
provisions N machines with real keys and real Provision calls over the lab bridge, waits for
the after-join work to settle, then reads the guest's figures from the image's runner
(guest/runner.py, `gk.role=server`): the server process's VmRSS and VmHWM, its CPU over
`--idle` seconds of guest time, the device's peer count, and the kernel's slab growth beside
them (the peers' memory lives there, outside any process).

Target (issue 12): <= 150 MB for the instance: here the server process's RSS plus the slab the
kernel took for the peers (the device's memory, which on the host is wireguard-go's RSS).
The guest runs under TCG, one vCPU: the fill is slow there, and idle CPU is the
guest's own accounting of an emulated core, so it is printed without a verdict, beside how
much slower that core runs a fixed Python loop than the host does (measured in the same run;
bench_scale.py gives the idle CPU verdict on the host). Run as root:

    python bench/bench_scale_vm.py [--count 10000] [--idle 30] [--settle 40] [--registry postgresql]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg

VM_TESTS = Path(__file__).resolve().parent.parent / "vm-tests"
sys.path.insert(0, str(VM_TESTS))

from bench_storm import STORM  # noqa: E402
from verdict import Verdict, emit  # noqa: E402
from vmtests.cli import DEFAULT_LOGS, preflight  # noqa: E402
from vmtests.errors import Skip, VmFailure  # noqa: E402
from vmtests.image import DEFAULT_CACHE, build_image  # noqa: E402
from vmtests.qemu import Vm, VmSpec, choose_accel, host_tsc_khz, kernel_cmdline  # noqa: E402

from gatekeeper.lab.siderolink_lab import SideroLinkLab  # noqa: E402

GUEST = "fd00:6b:1::200"
TAP = "tap0"
API_PORT = 8090
STATS_PORT = 7070
MAX_MB = 150.0
# The guest's kernel, Python, the server and SQLite's pages (in tmpfs) for 10,000 machines.
GUEST_MEMORY_MB = 1024


def ask(sl: SideroLinkLab, what: str, timeout: float = 60.0) -> dict[str, Any]:
    """One request to the guest runner's figures port, from the server namespace."""
    script = (
        "import socket,sys;"
        f"s=socket.create_connection(('{GUEST}',{STATS_PORT}),timeout={timeout});"
        f"s.sendall(b'{what}\\n');"
        "print(s.makefile().readline(),end='')"
    )
    done = subprocess.run(
        sl.server_ns.exec_argv([sys.executable, "-c", script]),
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise VmFailure(f"guest figures ({what}): {done.stderr.strip()[-300:] or 'no answer'}")
    answer: dict[str, Any] = json.loads(done.stdout)
    if "error" in answer:
        raise VmFailure(f"guest figures ({what}): {answer['error']}")
    if answer.get("exited") is not None:
        raise VmFailure(f"the guest's server exited with status {answer['exited']}")
    return answer


def wait_api(sl: SideroLinkLab, vm: Vm, timeout: float) -> None:
    script = (
        "import socket,time,sys\n"
        f"end=time.monotonic()+{timeout}\n"
        "while time.monotonic()<end:\n"
        "    try:\n"
        f"        socket.create_connection(('{GUEST}',{API_PORT}),timeout=2).close(); sys.exit(0)\n"
        "    except OSError: time.sleep(0.2)\n"
        "sys.exit(1)\n"
    )
    done = subprocess.run(
        sl.server_ns.exec_argv([sys.executable, "-c", script]), timeout=timeout + 10, check=False
    )
    if done.returncode != 0:
        vm.check_alive()
        raise VmFailure(f"the guest's server did not listen within {timeout:.0f} s")


def fill(sl: SideroLinkLab, count: int, concurrency: int) -> dict[str, Any]:
    argv = [
        sys.executable, str(STORM), f"[{GUEST}]:{API_PORT}", "--count", str(count),
        "--concurrency", str(concurrency), "--channels", "16", f"--token-file={sl.token_file()}",
    ]  # fmt: skip
    done = subprocess.run(
        sl.server_ns.exec_argv(argv), capture_output=True, text=True, timeout=3600, check=False
    )
    if done.returncode != 0:
        raise VmFailure(f"the fill failed: {done.stderr.strip()[-300:]}")
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def postgresql_for_guest(sl: SideroLinkLab, stack: contextlib.ExitStack) -> list[str]:
    """A PostgreSQL listening on the server namespace's underlay address (the host's side of
    the lab bridge, which the guest reaches), stopped before the lab goes; the guest runner's
    words for it. The password goes on the guest's kernel command line, as the join token
    does: a lab's."""
    from pgcluster import started_cluster, unavailable

    why = unavailable()
    if why is not None:
        raise Skip(f"--registry postgresql: {why}")
    try:
        cluster = started_cluster(netns=sl.server_ns.name, listen=sl.server_underlay)
    except (RuntimeError, OSError, psycopg.Error) as exc:
        raise RuntimeError(f"cannot start PostgreSQL for the guest: {exc}") from None
    stack.callback(cluster.close)
    try:
        dbname = cluster.create_database().split("/")[3].split("?")[0]
    except psycopg.Error as exc:
        raise RuntimeError(f"cannot create the guest's database: {exc}") from None
    url = f"postgresql://gatekeeper@[{sl.server_underlay}]:5432/{dbname}"
    return [f"gk.registry={url}", f"gk.registry_password={cluster.password}"]


def calibrate() -> float:
    """The guest runner's calibrate(), on the host: keep the two the same loop."""
    started = time.process_time()
    total = 0
    for i in range(3_000_000):
        total += i * i
    return time.process_time() - started


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (run_all's timeout, a service manager) unwinds like Ctrl-C: the VM is stopped
    # and the namespace removed on the way out.
    raise KeyboardInterrupt


def mb(kb: float) -> float:
    return kb / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of guest time")
    parser.add_argument("--settle", type=float, default=40.0, help="wait before measuring idle")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--registry",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="the guest server's registry: SQLite in the guest, or a PostgreSQL on the host "
        "that the guest reaches over the lab bridge",
    )
    args = parser.parse_args()
    # 0 machines would pass over nothing, 0 concurrency never fills, 0 s of idle divides by 0.
    for name in ("count", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.idle <= 0 or args.settle < 0:
        parser.error("--idle must be above 0 s and --settle not below 0 s")
    try:
        preflight()
        image = build_image(DEFAULT_CACHE, lambda line: print(f"  {line}", file=sys.stderr))
        DEFAULT_LOGS.mkdir(parents=True, exist_ok=True)
        accel, why = choose_accel("auto", image, DEFAULT_LOGS, DEFAULT_CACHE)
        log_dir = DEFAULT_LOGS / f"{time.strftime('%Y%m%d-%H%M%S')}-scale"
        log_dir.mkdir(parents=True)
        print(f"accelerator: {accel} ({why}); logs in {log_dir}", file=sys.stderr)
        with SideroLinkLab() as sl, contextlib.ExitStack() as stack:
            ns = sl.server_ns
            ns.run(["ip", "tuntap", "add", TAP, "mode", "tap"])
            ns.run(["ip", "link", "set", TAP, "master", "br0", "up"])
            words = ["gk.role=server", f"gk.ip={GUEST}/64", f"gk.token={sl.join_token}"]
            if args.registry == "postgresql":
                words += postgresql_for_guest(sl, stack)
            spec = VmSpec(
                image=image,
                cmdline=kernel_cmdline(words, host_tsc_khz()),
                console=log_dir / "console.log",
                accel=accel,
                memory_mb=GUEST_MEMORY_MB,
                tap=TAP,
                qmp=log_dir / "qmp.sock",
            )
            vm = Vm.start(spec, netns=ns.name, stderr_path=log_dir / "qemu.log")
            signal.signal(signal.SIGTERM, _interrupt)
            try:
                vm.console.wait_event("server-started", 90, "the guest's runner started a server")
                wait_api(sl, vm, 120)
                empty = ask(sl, "stats")
                print(f"server listening {vm.elapsed():.1f} s after QEMU started", file=sys.stderr)
                started = time.monotonic()
                outcomes = fill(sl, args.count, args.concurrency)
                fill_s = time.monotonic() - started
                print(f"fill: {fill_s:.1f} s, {outcomes['outcomes']}", file=sys.stderr)
                time.sleep(args.settle)
                before = ask(sl, "stats")
                time.sleep(args.idle)
                after = ask(sl, "stats peers")
                # Best of three on both sides: the least disturbed run of the same loop.
                guest_loop_s = min(ask(sl, "calibrate")["calibrate_s"] for _ in range(3))
                slower = guest_loop_s / min(calibrate() for _ in range(3))
            finally:
                try:
                    with contextlib.suppress(Exception):
                        tail = ask(sl, "log", 10).get("log_tail", "")
                        (log_dir / "server.log").write_text(tail)
                finally:
                    vm.stop()
    except Skip as exc:
        print(f"bench_scale_vm: skipped: {exc}", file=sys.stderr)
        return 77
    except KeyboardInterrupt:
        print("bench_scale_vm: interrupted; the VM is off and the lab removed", file=sys.stderr)
        return 130
    except (TimeoutError, VmFailure, subprocess.TimeoutExpired, RuntimeError) as exc:
        print(f"bench_scale_vm: failed: {exc}", file=sys.stderr)
        return 1

    guest_s = after["uptime"] - before["uptime"]
    idle_pct = 100 * (after["cpu_s"] - before["cpu_s"]) / guest_s
    slab_mb = mb(after["slab_kb"] - empty["slab_kb"])
    used_mb = mb(empty["mem_available_kb"] - after["mem_available_kb"])
    record = {
        "accel": accel,
        "registry": args.registry,
        "count": args.count,
        "fill_s": round(fill_s, 1),
        "fill": {k: outcomes[k] for k in ("per_s", "p99_ms", "outcomes")},
        "peers": after.get("peers"),
        "empty": empty,
        "settled": before,
        "after_idle": {k: v for k, v in after.items() if k != "log_tail"},
        "idle_cpu_pct": round(idle_pct, 3),
        "guest_cpu_slower": round(slower, 1),
        "kernel_slab_growth_mb": round(slab_mb, 1),
        "guest_memory_used_growth_mb": round(used_mb, 1),
    }
    print(json.dumps(record, indent=2))
    complete = outcomes["outcomes"].get("OK", 0) == args.count and after.get("peers") == args.count
    name = (
        f"scale (kernel WireGuard in the guest, {accel}, {args.registry}), "
        f"{after.get('peers')} peers"
    )
    rss = mb(after["rss_kb"])
    # The device's memory is the kernel's here, where wireguard-go's is a process's on the host:
    # the instance is the server process and the slab its peers took, as bench_scale.py's is
    # the server and its wireguard-go.
    instance = rss + slab_mb
    ok = emit(
        "scale_vm",
        [
            Verdict(
                f"{name}: the instance: server RSS + the kernel's slab growth for its peers",
                f"<= {MAX_MB:g} MB",
                instance,
                "MB",
                ok=complete and instance <= MAX_MB,
                note=f"server {rss:.1f} MB (empty {mb(empty['rss_kb']):.1f}), slab {slab_mb:.1f} MB"
                + ("" if complete else f"; fill incomplete: {outcomes['outcomes']}"),
            ),
            Verdict(
                f"{name}: server peak RSS (VmHWM), the fill included", "", mb(after["hwm_kb"]), "MB"
            ),
            Verdict(
                f"{name}: beside it, guest memory in use, growth since the server was empty",
                "",
                used_mb,
                "MB",
                note="the server's growth, the slab"
                + (", and SQLite's files in tmpfs" if args.registry == "sqlite" else ""),
            ),
            # No verdict: the target's core is a real one, and this is an emulated core that
            # runs Python about `slower` times slower than the host's (measured just now).
            # bench_scale.py gives the idle CPU verdict, on the host.
            Verdict(
                f"{name}: idle CPU of the server, of the guest's emulated core",
                "",
                idle_pct,
                "%",
                note=f"over {guest_s:.0f} s of guest time, {args.settle:g} s after the fill; "
                f"that core runs Python {slower:.1f}x slower than the host's: about "
                f"{idle_pct / slower:.2f} % of a host core",
            ),
        ],
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
