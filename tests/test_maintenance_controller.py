"""What the agent's maintenance controller publishes for a link (no network: the store only)."""

from __future__ import annotations

import asyncio
import ipaddress

from gatekeeper.agent.maintenance_controller import LinkView, MaintenanceController
from gatekeeper.config.siderolink import SideroLinkConfig, parse_api_url
from gatekeeper.link.lifecycle import LinkSpec, Status
from gatekeeper.maintenance import catalog
from gatekeeper.maintenance.resources import NotFound
from gatekeeper.maintenance.wire import to_proto

URL = "grpc://[fd00:6b:1::1]:8090?jointoken=s3cret"
VIRTUAL = "[fdae:41e4:649b:9304:1111:2222:3333:4444]:50889"


def view(tunnel: bool) -> LinkView:
    config = SideroLinkConfig(api=parse_api_url(URL, "test"), source="test")
    spec = LinkSpec(
        name="siderolinktun" if tunnel else "siderolink",
        address=ipaddress.IPv6Interface("fdae:41e4:649b:9303:aaaa:bbbb:cccc:dddd/64"),
        mtu=1280,
        listen_port=51821,
        server_public_key="",
        server_address=ipaddress.IPv6Address("fdae:41e4:649b:9303::1"),
        endpoint=VIRTUAL if tunnel else "[fd00:6b:1::1]:51820",
        keepalive=25,
        grpc_peer_addr_port=VIRTUAL if tunnel else "",
    )
    status = Status(connected=True, link_name=spec.name, tunnel=tunnel)
    return LinkView(
        config=config,
        status=status,
        spec=spec,
        link_index=7,
        public_key="",
        listen_port=51821,
        node_uuid=None,
    )


def test_the_tunnel_resource_exists_in_tunnel_mode_only() -> None:
    async def scenario() -> None:
        controller = MaintenanceController(port=0)
        try:
            store = controller.store
            await controller.reconcile(view(tunnel=True))
            tunnel = store.get("config", catalog.SIDEROLINK_TUNNEL.type, "siderolink-tunnel")
            assert dict(tunnel.spec) == {
                "apiEndpoint": URL,
                "linkName": "siderolinktun",
                "mtu": 1280,
                "nodeAddress": VIRTUAL,
            }
            # proto_spec: common.NetIPPort{ip = 16 bytes, port = 50889} in field 4.
            raw = to_proto(tunnel, catalog.SIDEROLINK_TUNNEL).spec.proto_spec
            ip = ipaddress.IPv6Address(VIRTUAL[1:].split("]")[0]).packed
            assert raw.endswith(b"\x22\x16\x0a\x10" + ip + b"\x10\xc9\x8d\x03")
            status = store.get("config", catalog.SIDEROLINK_STATUS.type, "siderolink-status")
            assert status.spec["host"] == "fd00:6b:1::1"  # bare: no brackets, no port
            await controller.reconcile(view(tunnel=False))
            try:
                store.get("config", catalog.SIDEROLINK_TUNNEL.type, "siderolink-tunnel")
            except NotFound:
                pass
            else:
                raise AssertionError("the tunnel resource outlived tunnel mode")
        finally:
            await controller.close()

    asyncio.run(scenario())
