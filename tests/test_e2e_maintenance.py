"""The maintenance API served by a real agent over a real WireGuard overlay, and nowhere else."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

import pytest

from gatekeeper.lab.netns import Namespace
from gatekeeper.lab.siderolink_lab import Machine, SideroLinkLab, registry_endpoints

pytestmark = pytest.mark.netns

MAINT = [sys.executable, "-m", "gatekeeper", "maint"]


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def maint(ns: Namespace, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ns.exec_argv([*MAINT, *args, "--timeout", "5"]),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def next_document(stream: IO[str]) -> dict[str, Any] | None:
    """The next JSON document of `-o json` output (indented, one document per resource)."""
    text = ""
    for line in stream:
        text += line
        try:
            doc: dict[str, Any] = json.loads(text)
        except ValueError:
            continue
        return doc
    return None


def node_ip(status: dict[str, str]) -> str:
    return status["node_address"].split("/")[0]


def wait_answering(ns: Namespace, address: str, timeout: float = 10) -> float:
    started = time.monotonic()
    while True:
        out = maint(ns, "version", "-n", address)
        if out.returncode == 0:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, out.stderr
        time.sleep(0.1)


def connected_machine(sl: SideroLinkLab) -> tuple[Machine, dict[str, str]]:
    sl.start_server()
    machine = sl.add_machine()
    return machine, sl.wait_connected(machine)


def test_version_and_resources_over_the_overlay(sl: SideroLinkLab) -> None:
    machine, status = connected_machine(sl)
    address = node_ip(status)
    wait_answering(sl.server_ns, address)
    version = maint(sl.server_ns, "version", "-n", address)
    assert version.returncode == 0 and "Tag:" in version.stdout
    got = maint(sl.server_ns, "get", "siderolinkstatus", "-n", address, "-o", "json")
    assert got.returncode == 0, got.stderr
    spec = json.loads(got.stdout)["spec"]
    assert spec["connected"] is True and spec["linkName"] == "siderolink"
    # The server side is an admin (its source is in the overlay prefix): it reads the
    # sensitive config in full, as Talos gives it to SideroLink peers.
    config = maint(sl.server_ns, "get", "siderolinkconfig", "-n", address, "-o", "yaml")
    assert config.returncode == 0, config.stderr
    assert f"joinToken: {sl.join_token}" in config.stdout
    info = maint(sl.server_ns, "get", "systeminformation", "-n", address, "-o", "json")
    assert machine.node_uuid in info.stdout


def test_refused_everywhere_but_the_overlay_address(sl: SideroLinkLab) -> None:
    machine, status = connected_machine(sl)
    wait_answering(sl.server_ns, node_ip(status))
    for ns, address in (
        (sl.server_ns, machine.underlay),
        (machine.ns, "127.0.0.1"),
        (machine.ns, "::1"),
        (machine.ns, machine.underlay),
    ):
        out = maint(ns, "version", "-n", address)
        assert out.returncode == 1 and "Connection refused" in out.stderr, (address, out.stderr)


def test_watch_sees_the_link_go_down_and_up(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine(start=False)
    # A short link timeout keeps the outage (and TCP's retransmission backoff) brief.
    sl.start_agent(machine, "--link-timeout", "4")
    address = node_ip(sl.wait_connected(machine))
    wait_answering(sl.server_ns, address)
    watch = subprocess.Popen(
        sl.server_ns.exec_argv(
            [*MAINT, "get", "siderolinkstatus", "-n", address, "-o", "json", "--watch"]
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        first = next_document(watch.stdout)
        assert first is not None and first["spec"]["connected"] is True
        sl.server_ns.run(["ip", "link", "set", "v1", "down"])
        sl.wait_status(machine, lambda s: not s.get("connected"), 20, "down")
        sl.server_ns.run(["ip", "link", "set", "v1", "up"])
        sl.wait_connected(machine, timeout=30)
        seen: list[bool] = []
        while seen[-2:] != [False, True]:
            doc = next_document(watch.stdout)
            assert doc is not None, f"watch ended after {seen}"
            seen.append(doc["spec"]["connected"])
    finally:
        watch.kill()
        watch.wait()


def test_listener_moves_with_the_overlay_address_without_restart(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine(start=False)
    config = machine.run_dir / "siderolink.yaml"
    doc = "apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: {url}\nuniqueToken: {token}\n"
    config.write_text(doc.format(url=sl.api_url(), token="first"))
    sl.start_agent(machine, "--config", str(config))
    old = node_ip(sl.wait_connected(machine))
    wait_answering(sl.server_ns, old)
    pid = machine.proc.pid if machine.proc else None
    # Another unique token makes this another machine for the server: a new address.
    config.write_text(doc.format(url=sl.api_url(), token="second"))
    new_status = sl.wait_status(
        machine,
        lambda s: s.get("connected") and node_ip(s) != old,
        30,
        "connected at a new address",
    )
    new = node_ip(new_status)
    wait_answering(sl.server_ns, new)
    refused = maint(sl.server_ns, "version", "-n", old)
    assert refused.returncode == 1
    assert machine.proc is not None and machine.proc.pid == pid and machine.proc.poll() is None


def test_api_answers_again_after_a_server_crash(sl: SideroLinkLab) -> None:
    machine, status = connected_machine(sl)
    address = node_ip(status)
    wait_answering(sl.server_ns, address)
    deadline = time.monotonic() + 15
    while not registry_endpoints(sl.state_dir).get(machine.node_uuid):
        assert time.monotonic() < deadline, "the server never recorded the machine's endpoint"
        time.sleep(0.2)
    sl.stop_server(kill=True)
    sl.start_server()
    wait_answering(sl.server_ns, address, timeout=20)
    after = machine.status()
    assert node_ip(after) == address and after["provisions"] == status["provisions"]
