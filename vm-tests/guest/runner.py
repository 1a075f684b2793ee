"""In the guest: bring up the underlay, run `gatekeeper agent` as the machine's service, report.

Started by /sbin/gk-init with its output on the serial console. Every report is one line,
`@@GK {"event": ..., "uptime": ...}`, which the host reads from the console log; the agent's
own log lines go through here too (prefixed `agent|`), so two writers never mix a line.

Kernel command line parameters (besides siderolink.api=, which is the agent's business):
  gk.ip=ADDR/PREFIX      the underlay address of eth0
  gk.node_uuid=UUID      the node UUID when the machine has no SMBIOS (QEMU microvm has none)
  gk.checks=a,b          extra checks once the link is up: contract, firewall
  gk.role=server         run `gatekeeper server` on kernel WireGuard instead of the agent
                         (bench/bench_scale_vm.py), with gk.token=TOKEN as its join token,
                         and answer resource figures on TCP port 7070 (see serve_stats);
                         gk.registry=URL and gk.registry_password=PW: its registry (a
                         PostgreSQL on the host's lab bridge) instead of SQLite in /run
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

# Not typing nor pathlib: importing them costs the guest's boot tenths of a second under TCG
# (mypy reads the import below; Python never runs it).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PREFIX = "@@GK "
RUN_DIR = "/run/gatekeeper"
SERVER_STATE = "/run/gatekeeper-server"
SERVER_LOG = "/run/gatekeeper-server.log"
SERVER_INTERFACE = "gks0"
SERVER_API_PORT = 8090
SERVER_WG_PORT = 51820
STATS_PORT = 7070
PRODUCT_UUID = "/sys/class/dmi/id/product_uuid"
_lock = threading.Lock()


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def uptime() -> float:
    return float(read_text("/proc/uptime").split()[0])


def say(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "uptime": uptime(), **fields}, sort_keys=True)
    with _lock:
        sys.stdout.write(PREFIX + line + "\n")
        sys.stdout.flush()


def params() -> dict[str, str]:
    found = {}
    for word in read_text("/proc/cmdline").split():
        key, sep, value = word.partition("=")
        if key.startswith("gk.") and sep:
            found[key[3:]] = value
    return found


def setup_network(address: str | None) -> None:
    """lo and eth0 up, eth0 addressed: with iproute2's ip, which starts faster under TCG than
    a Python netlink client here. Full path: busybox has an `ip` too."""
    ip = "/usr/sbin/ip"
    commands = [[ip, "link", "set", "lo", "up"]]
    if address:
        # nodad: duplicate-address detection would hold the address back for seconds.
        commands.append([ip, "addr", "add", address, "dev", "eth0", "nodad"])
    commands.append([ip, "link", "set", "eth0", "up"])
    for argv in commands:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            say("error", error=f"{' '.join(argv)}: {done.stderr.strip()}")
    say("network", address=address)


def relay(stream: Any, label: str) -> None:
    for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        with _lock:
            sys.stdout.write(f"{label}| {line}\n")
            sys.stdout.flush()


def start_agent(node_uuid: str | None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "gatekeeper", "agent", "--run-dir", RUN_DIR]
    if node_uuid and not os.path.exists(PRODUCT_UUID):
        argv += ["--node-uuid", node_uuid]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threading.Thread(target=relay, args=(proc.stdout, "agent"), daemon=True).start()
    say("agent-started", pid=proc.pid)
    return proc


def read_status() -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(read_text(os.path.join(RUN_DIR, "status.json")))
    except (OSError, ValueError):
        return {}
    return doc


def run_contract() -> None:
    from gatekeeper.wireguard import contract
    from gatekeeper.wireguard.kernel import KernelBackend

    passed: list[str] = []
    failed: dict[str, str] = {}
    started = time.monotonic()
    for check in contract.CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            check(KernelBackend(), "gkc0")
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
        else:
            passed.append(name)
    say("contract", passed=passed, failed=failed, seconds=round(time.monotonic() - started, 2))


def run_firewall_show() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gatekeeper", "firewall", "show", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        shown: Any = json.loads(done.stdout)
    except ValueError:
        shown = None
    say(
        "firewall",
        returncode=done.returncode,
        show=shown,
        stderr=done.stderr.strip()[-400:],
    )


def report_selection() -> None:
    from gatekeeper.wireguard.select import kernel_wireguard

    available, why = kernel_wireguard()
    say("kernel-wireguard", available=available, reason=why)


def run_checks(names: list[str]) -> None:
    report_selection()
    for name in names:
        try:
            if name == "contract":
                run_contract()
            elif name == "firewall":
                run_firewall_show()
            elif name:
                say("error", error=f"unknown check {name!r}")
        except Exception as exc:  # report, never stop reporting
            say("check-error", check=name, error=f"{type(exc).__name__}: {exc}")


def secret_file(name: str, value: str) -> str:
    path = os.path.join(SERVER_STATE, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return path


def start_server(
    address: str, token: str, registry: str = "", password: str = ""
) -> subprocess.Popen[bytes]:
    """`gatekeeper server` on kernel WireGuard, its log in a file: relaying ten thousand
    provision lines through an emulated serial port would cost the guest more than serving
    them."""
    os.makedirs(SERVER_STATE, exist_ok=True)
    token_file = secret_file("join-token", token)
    argv = [
        sys.executable, "-m", "gatekeeper", "server",
        "--state-dir", SERVER_STATE,
        "--listen", f"[{address}]:{SERVER_API_PORT}",
        "--join-token-file", token_file,
        "--wireguard-backend", "kernel",
        "--wireguard-interface", SERVER_INTERFACE,
        "--wireguard-port", str(SERVER_WG_PORT),
        "--endpoint", f"[{address}]:{SERVER_WG_PORT}",
    ]  # fmt: skip
    if registry:
        argv += ["--registry", registry]
        argv += ["--registry-password-file", secret_file("registry-password", password)]
    log = open(SERVER_LOG, "ab")  # noqa: SIM115 (the server's for its whole life)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    say("server-started", pid=proc.pid)
    return proc


def meminfo() -> dict[str, int]:
    found = {}
    for line in read_text("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        found[key] = int(rest.split()[0])
    return found


def process_figures(pid: int) -> dict[str, Any]:
    status = {}
    for line in read_text(f"/proc/{pid}/status").splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            status[key] = int(rest.split()[0])
    fields = read_text(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "rss_kb": status.get("VmRSS", 0),
        "hwm_kb": status.get("VmHWM", 0),
        "cpu_s": (int(fields[11]) + int(fields[12])) / ticks,
    }


def device_peers() -> int:
    from gatekeeper.wireguard import rtnl
    from gatekeeper.wireguard.kernel import KernelDevice

    link = rtnl.get_link(SERVER_INTERFACE)
    if link is None:
        return -1
    # Read only: never close() this handle, that deletes the server's link.
    return len(KernelDevice(SERVER_INTERFACE, link.index).peers())


def calibrate() -> float:
    """CPU seconds of a fixed pure-Python loop: bench_scale_vm.py runs the same on the host, and
    the ratio is how much slower the guest's emulated CPU is (TCG) in that run."""
    started = time.process_time()
    total = 0
    for i in range(3_000_000):
        total += i * i
    return time.process_time() - started


def serve_stats(server: subprocess.Popen[bytes], address: str) -> None:
    """One JSON line per connection: the server process's memory and CPU, the kernel's slab
    and free memory, and (when the request line says `peers`) the device's peer count. Only
    the bench on the lab bridge reaches it; it is in the bench image role, not the product."""
    import socket

    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((address, STATS_PORT))
        listener.listen(4)
    except OSError as exc:
        say("error", error=f"figures port [{address}]:{STATS_PORT}: {exc}")
        return
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            try:
                request = conn.recv(64).decode(errors="replace")
                figures: dict[str, Any] = {"uptime": uptime(), "exited": server.poll()}
                if server.poll() is None:
                    figures.update(process_figures(server.pid))
                mem = meminfo()
                figures.update(
                    slab_kb=mem.get("Slab", 0),
                    sunreclaim_kb=mem.get("SUnreclaim", 0),
                    mem_available_kb=mem.get("MemAvailable", 0),
                )
                if "peers" in request:
                    figures["peers"] = device_peers()
                if "calibrate" in request:
                    figures["calibrate_s"] = calibrate()
                if "log" in request:
                    with open(SERVER_LOG, "rb") as f:
                        figures["log_tail"] = f.read()[-4000:].decode(errors="replace")
            except Exception as exc:  # report it to the bench, keep serving
                figures = {"error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):
                conn.sendall((json.dumps(figures) + "\n").encode())


def server_role(options: dict[str, str]) -> None:
    address = options.get("ip", "").split("/")[0]
    server = start_server(
        address,
        options.get("token", ""),
        options.get("registry", ""),
        options.get("registry_password", ""),
    )
    threading.Thread(target=serve_stats, args=(server, address), daemon=True).start()
    server.wait()
    tail = ""
    with contextlib.suppress(OSError), open(SERVER_LOG, "rb") as f:
        tail = f.read()[-2000:].decode(errors="replace")
    # The guest powers off next: the reason must reach the console (the server logs no token).
    say("server-exited", returncode=server.returncode, log_tail=tail)


def main() -> None:
    say("runner", python=sys.version.split()[0])
    options = params()
    with contextlib.suppress(OSError):
        modules = read_text("/proc/modules")
        say("modules", wireguard=any(m.startswith("wireguard ") for m in modules.splitlines()))
    setup_network(options.get("ip"))
    if options.get("role") == "server":
        server_role(options)
        return
    agent = start_agent(options.get("node_uuid"))
    checks = [c for c in options.get("checks", "").split(",") if c]
    last: tuple[Any, ...] = ()
    checked = False
    reported_exit = False
    while True:
        status = read_status()
        key = tuple(
            status.get(k)
            for k in ("state", "connected", "backend", "last_error", "node_address", "tunnel")
        )
        if status and key != last:
            last = key
            say("status", status=status)
        if status.get("connected") and not checked:
            checked = True
            run_checks(checks)
            say("ready")
        if agent.poll() is not None and not reported_exit:
            reported_exit = True
            say("agent-exited", returncode=agent.returncode)
        time.sleep(0.05)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
