"""/metrics while the store is away (docs/registry.md, "Owners and failover"): a real server on a
real PostgreSQL that the test stops and starts. The scrape still answers, says the registry
is down and how old this instance's heartbeat is (a cut-off instance is what an operator
must see), and the fleet's own gauges say "unknown" rather than failing the whole page."""

from __future__ import annotations

import re
import time

import pytest
from fleetlab import api_target, provisions, scrape
from pgcluster import PgCluster
from test_fleet_postgres import outcome, request

from gatekeeper.lab.siderolink_lab import SideroLinkLab
from gatekeeper.server.instances import HEARTBEAT_EVERY

pytestmark = pytest.mark.netns

METRICS_PORT = 9102


def value(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics:\n{text}"
    return float(found[1])


def scraped_once_registry_up_is(sl: SideroLinkLab, up: int) -> str:
    """/metrics once `gatekeeper_registry_up` says `up`: the next heartbeat after a change
    of the store's state tells it."""
    deadline = time.monotonic() + HEARTBEAT_EVERY + 8
    while time.monotonic() < deadline:
        text = scrape(sl, METRICS_PORT)
        if value(text, "gatekeeper_registry_up") == up:
            return text
        time.sleep(0.5)
    raise AssertionError(f"gatekeeper_registry_up never became {up}\n{sl.tail(sl.server_log)}")


def test_metrics_answer_while_the_store_is_down_and_say_so(own_cluster: PgCluster) -> None:
    url = own_cluster.create_database()
    with SideroLinkLab() as sl:
        sl.start_server(
            "--registry", url,
            "--registry-password-file", str(own_cluster.password_file),
            "--metrics-listen", f"[{sl.server_underlay}]:{METRICS_PORT}",
        )  # fmt: skip
        m = sl.add_machine(start=False)
        assert [outcome(r) for r in provisions(m, api_target(sl), [request(sl.join_token)])] == [
            "OK"
        ]
        up = scrape(sl, METRICS_PORT)
        assert value(up, "gatekeeper_machines_registered") == 1
        assert value(up, "gatekeeper_registry_up") == 1
        assert value(up, "gatekeeper_instance_heartbeat_age_seconds") < HEARTBEAT_EVERY + 2
        own_cluster.stop()
        down = scraped_once_registry_up_is(sl, 0)
        assert value(down, "gatekeeper_instance_heartbeat_age_seconds") > HEARTBEAT_EVERY
        # Unknown, not a failed page: Prometheus keeps every other series of this scrape.
        assert value(down, "gatekeeper_machines_registered") != value(
            down, "gatekeeper_machines_registered"
        )  # NaN
        own_cluster.start()
        back = scraped_once_registry_up_is(sl, 1)
        assert value(back, "gatekeeper_machines_registered") == 1
        assert value(back, "gatekeeper_instance_heartbeat_age_seconds") < HEARTBEAT_EVERY + 2
        assert "Traceback" not in sl.server_log.read_text()
