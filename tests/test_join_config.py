"""`gatekeeper join-config` against a real server: the agent boots from exactly its output.

The kernel-argument form is written verbatim as the machine's kernel command line: the machine
joins and its status events reach the server's event sink. The YAML form is given verbatim as
the agent's --config: the machine joins, over the gRPC tunnel when --tunnel asked for it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fleetlab import gk

from gatekeeper.lab.siderolink_lab import API_PORT, SideroLinkLab

pytestmark = pytest.mark.netns

SERVER = "fdae:41e4:649b:9303::1"


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def eventually(what: str, check: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def test_kernel_arguments_boot_a_machine_that_joins_and_sends_events(sl: SideroLinkLab) -> None:
    sl.start_server()
    token_file = sl.workdir / "join-token"
    done = gk(sl, "join-config", "--token-file", str(token_file))
    api = f"grpc://[{sl.server_underlay}]:{API_PORT}?jointoken={sl.join_token}"
    assert done.stdout == (
        f"siderolink.api={api} talos.events.sink=[{SERVER}]:8090 "
        f"talos.logging.kernel=tcp://[{SERVER}]:8092\n"
    )
    m = sl.add_machine(start=False)
    m.cmdline.write_text(done.stdout)
    sl.start_agent(m)
    status = sl.wait_connected(m)
    assert status["tunnel"] is False

    def connected_events() -> list[dict[str, Any]]:
        out = gk(sl, "events", "--json", "--machine", m.node_uuid).stdout
        return [e for e in map(json.loads, out.splitlines()) if e.get("data", {}).get("connected")]

    eventually("a connected event from the machine", connected_events)

    parts = json.loads(gk(sl, "join-config", "--token-file", str(token_file), "--json").stdout)
    assert parts["kernel_args"] == done.stdout.split()
    assert parts["tls"] is False and parts["events_sink"] == f"[{SERVER}]:8090"


def test_documents_with_a_new_token_boot_a_machine_over_the_tunnel(sl: SideroLinkLab) -> None:
    sl.start_server()
    done = gk(
        sl, "join-config", "--create-token", "--name", "rack-4", "--tunnel", "--format", "yaml"
    )
    kinds = [line for line in done.stdout.splitlines() if line.startswith("kind:")]
    assert kinds == ["kind: SideroLinkConfig", "kind: EventSinkConfig", "kind: KmsgLogConfig"]
    assert "grpc_tunnel=true" in done.stdout
    (token,) = json.loads(gk(sl, "token", "list", "--json").stdout)
    assert token["name"] == "rack-4" and token["uses"] == 0

    m = sl.add_machine(start=False)
    m.cmdline.write_text("console=ttyS0\n")  # nothing on the kernel command line
    config = m.run_dir / "machine.yaml"
    config.write_text(done.stdout)
    sl.start_agent(m, "--config", str(config))
    status = sl.wait_connected(m, timeout=30)
    assert status["tunnel"] is True and status["link_name"] == "siderolinktun"
    (token,) = json.loads(gk(sl, "token", "list", "--json").stdout)
    assert token["uses"] == 1


def test_refuses_what_would_not_join(sl: SideroLinkLab) -> None:
    missing = gk(sl, "join-config", check=False)
    assert missing.returncode == 1
    assert "no server.json in" in missing.stderr and "start `gatekeeper server" in missing.stderr

    sl.start_server()
    no_token = gk(sl, "join-config", check=False)
    assert no_token.returncode == 1 and no_token.stdout == ""
    assert no_token.stderr.strip() == (
        "gatekeeper join-config: this server requires a join token: "
        "pass --token-file PATH or --create-token"
    )

    created = gk(sl, "token", "create", "--name", "old").stdout.strip()
    saved = sl.workdir / "old-token"
    saved.write_text(created + "\n")
    gk(sl, "token", "revoke", created.split(".")[0])
    revoked = gk(sl, "join-config", "--token-file", str(saved), check=False)
    assert revoked.returncode == 1 and revoked.stdout == ""
    assert f"token {created.split('.')[0]} (old) is revoked" in revoked.stderr
    assert created.split(".")[1] not in revoked.stderr  # never the secret

    bad_url = gk(sl, "join-config", "--create-token", "--api-url", "ftp://x", check=False)
    assert bad_url.returncode == 1 and "--api-url 'ftp://x' is not" in bad_url.stderr
    stray = gk(sl, "join-config", "--name", "x", check=False)
    assert stray.returncode == 1 and "go with --create-token" in stray.stderr
