"""The maintenance API's pure parts: resource store, catalog, authz rules, bind targets, codecs."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
import yaml

from gatekeeper.maintenance import catalog, output, policy
from gatekeeper.maintenance.binding import ListenAll, ListenOn, NotListening, bind_target
from gatekeeper.maintenance.client import ClientError, spec_dict
from gatekeeper.maintenance.resources import (
    RESOURCE_DEFINITION_TYPE,
    EventType,
    InvalidRequest,
    NotFound,
    ResourceDefinition,
    ResourceStore,
)
from gatekeeper.maintenance.wire import encode_fields, to_proto
from gatekeeper.pb.cosi import meta_pb2, resource_pb2

STATUS = catalog.SIDEROLINK_STATUS.type


def test_versions_count_changes_and_identical_puts_are_no_ops() -> None:
    clock = iter(range(100, 200))
    store = ResourceStore(catalog.CATALOG, clock=lambda: float(next(clock)))
    a = catalog.publish_siderolink_status(
        store, host="h:443", connected=False, link_name="siderolink", tunnel=False
    )
    again = catalog.publish_siderolink_status(
        store, host="h:443", connected=False, link_name="siderolink", tunnel=False
    )
    b = catalog.publish_siderolink_status(
        store, host="h:443", connected=True, link_name="siderolink", tunnel=False
    )
    assert (a.version, again.version, b.version) == (1, 1, 2)
    assert b.created == a.created and b.updated > a.updated
    assert store.get("config", STATUS, "siderolink-status").spec["connected"] is True


def test_reader_errors_name_what_is_wrong() -> None:
    store = catalog.new_store()
    with pytest.raises(NotFound, match=r"'Nope\.x\.dev' is not registered"):
        store.list("config", "Nope.x.dev")
    with pytest.raises(NotFound, match="namespace 'nowhere' does not exist"):
        store.list("nowhere", STATUS)
    with pytest.raises(InvalidRequest, match="an id is required"):
        store.get("config", STATUS, "")
    with pytest.raises(NotFound, match=r"SiderolinkStatuses.siderolink.talos.dev\(config/x\)"):
        store.get("config", STATUS, "x")
    with pytest.raises(InvalidRequest, match="type is required"):
        store.get("config", "", "x")
    # An empty namespace means the type's default namespace, case of the type is forgiven.
    assert store.list("", STATUS.lower()) == []


def test_definitions_derive_aliases_like_cosi() -> None:
    rd = catalog.SIDEROLINK_STATUS
    assert rd.display_type == "SiderolinkStatus"
    assert rd.aliases == ("siderolinkstatus", "ss")
    assert rd.all_aliases[:3] == (
        "siderolinkstatuses",
        "siderolinkstatuses.siderolink",
        "siderolinkstatuses.siderolink.talos",
    )
    assert catalog.ADDRESS_STATUS.display_type == "AddressStatus"
    assert catalog.ADDRESS_STATUS.aliases == ("address", "addresses", "addressstatus", "as")
    assert catalog.SYSTEM_INFORMATION.aliases == ("systeminformation", "si", "sis")
    assert rd.matches("SiderolinkStatuses.siderolink.talos.dev") and rd.matches("SS")
    with pytest.raises(ValueError, match=r"Plurals\.suffix\.domain"):
        ResourceDefinition("lowercase.x.dev", "ns")


def test_every_definition_is_published_in_meta_with_its_proto_spec() -> None:
    store = catalog.new_store()
    rds = {r.id: r for r in store.list("meta", RESOURCE_DEFINITION_TYPE)}
    assert "siderolinkconfigs.siderolink.talos.dev" in rds
    wire = to_proto(rds["siderolinkconfigs.siderolink.talos.dev"], None)
    spec = meta_pb2.ResourceDefinitionSpec.FromString(wire.spec.proto_spec)
    assert spec.resource_type == "SiderolinkConfigs.siderolink.talos.dev"
    assert spec.default_namespace == "config"
    assert spec.sensitivity == meta_pb2.ResourceDefinitionSpec.SENSITIVE
    assert [(c.name, c.json_path) for c in spec.print_columns] == [
        ("API Endpoint", "{.apiEndpoint}"),
        ("Tunnel", "{.tunnel}"),
    ]
    assert yaml.safe_load(wire.spec.yaml_spec)["sensitivity"] == "sensitive"
    assert store.namespaces() == ["config", "hardware", "meta", "network", "runtime"]


def test_yaml_spec_keeps_field_order_and_go_indentation() -> None:
    store = catalog.new_store()
    r = catalog.publish_link_status(
        store, "siderolink", index=7, mtu=1280, up=True, wireguard_listen_port=51820
    )
    text = to_proto(r, catalog.LINK_STATUS).spec.yaml_spec
    assert text.splitlines()[:2] == ["index: 7", "type: none"]
    assert "wireguard:\n    listenPort: 51820\n" in text


def test_proto_spec_uses_upstream_field_numbers() -> None:
    spec = {"host": "h:443", "connected": True, "linkName": "siderolink", "grpcTunnel": False}
    raw = encode_fields(spec, catalog.SIDEROLINK_STATUS.proto_fields)
    # field 1 "h:443", field 2 true, field 3 "siderolink"; false is omitted as proto3 does.
    assert raw == b"\x0a\x05h:443" + b"\x10\x01" + b"\x1a\x0asiderolink"
    assert encode_fields({"index": 300}, catalog.LINK_STATUS.proto_fields) == b"\x08\xac\x02"


def test_the_sensitive_config_is_stored_whole_and_only_admins_may_read_it() -> None:
    store = catalog.new_store()
    url = "https://sl.example/?jointoken=s3cret"
    r = catalog.publish_siderolink_config(
        store,
        api_endpoint=url,
        host="sl.example:443",
        join_token="s3cret",
        insecure=False,
        tunnel=True,
    )
    assert r.spec["apiEndpoint"] == url and r.spec["joinToken"] == "s3cret"
    assert catalog.SIDEROLINK_CONFIG.sensitive and catalog.SIDEROLINK_TUNNEL.sensitive


def test_addresses_are_synced_per_link() -> None:
    store = catalog.new_store()
    catalog.publish_addresses(store, "siderolink", ["fdae:41e4:649b:9303::7081/64"])
    catalog.publish_addresses(store, "eth0", ["10.0.0.2/24"])
    catalog.publish_addresses(store, "siderolink", ["fdae:41e4:649b:9303::99/64"])
    ids = [r.id for r in store.list("network", catalog.ADDRESS_STATUS.type)]
    assert ids == ["eth0/10.0.0.2/24", "siderolink/fdae:41e4:649b:9303::99/64"]
    catalog.remove_link_status(store, "siderolink")
    assert [r.id for r in store.list("network", catalog.ADDRESS_STATUS.type)] == [
        "eth0/10.0.0.2/24"
    ]


async def test_kind_watch_bootstraps_then_streams_changes() -> None:
    store = catalog.new_store()
    catalog.publish_siderolink_status(store, host="h", connected=False, link_name="l", tunnel=False)
    events = store.watch("config", STATUS, bootstrap=True)
    first = await anext(events)
    marker = await anext(events)
    assert (first.type, first.resource and first.resource.version) == (EventType.CREATED, 1)
    assert marker.type is EventType.BOOTSTRAPPED and marker.resource is None
    catalog.publish_siderolink_status(store, host="h", connected=True, link_name="l", tunnel=False)
    update = await asyncio.wait_for(anext(events), 1)
    assert update.type is EventType.UPDATED
    assert update.old is not None and update.old.spec["connected"] is False
    assert update.resource is not None and update.resource.spec["connected"] is True
    catalog.clear_siderolink_config(store)
    gone = await asyncio.wait_for(anext(events), 1)
    assert gone.type is EventType.DESTROYED
    await events.aclose()
    assert store.watcher_count == 0


async def test_single_watch_starts_with_current_state_or_a_tombstone() -> None:
    store = catalog.new_store()
    events = store.watch("config", STATUS, "siderolink-status")
    first = await anext(events)
    assert first.type is EventType.DESTROYED and first.resource is not None
    assert first.resource.version == 0
    catalog.publish_siderolink_status(store, host="h", connected=True, link_name="l", tunnel=False)
    created = await asyncio.wait_for(anext(events), 1)
    assert created.type is EventType.CREATED
    await events.aclose()


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv6:[fdae:41e4:649b:9303::1]:40000", "fdae:41e4:649b:9303::1"),
        ("ipv6:%5Bfdae:41e4:649b:9303::1%5D:40000", "fdae:41e4:649b:9303::1"),
        ("ipv4:10.0.0.1:5000", "10.0.0.1"),
        ("ipv6:[::ffff:10.0.0.1]:5000", "10.0.0.1"),
        ("unix:/run/x.sock", None),
        ("ipv6:[garbage]:1", None),
    ],
)
def test_peer_addresses_are_parsed_from_grpc_peer_strings(peer: str, expected: str | None) -> None:
    addr = policy.peer_address(peer)
    assert (str(addr) if addr else None) == expected


def test_roles_come_from_the_overlay_prefix() -> None:
    prefix = ipaddress.ip_network("fdae:41e4:649b:9303::/64")
    inside = "ipv6:[fdae:41e4:649b:9303::1]:1"
    outside = "ipv6:[fd00:10::1]:1"
    assert policy.role_for(inside, prefix) is policy.Role.ADMIN
    assert policy.role_for(outside, prefix) is policy.Role.READER
    assert policy.role_for(inside, None) is policy.Role.READER
    assert policy.role_for("ipv4:10.0.0.1:1", prefix) is policy.Role.READER


def test_methods_are_classified() -> None:
    assert policy.classify("/cosi.resource.State/Get") is policy.MethodClass.SERVED
    assert policy.classify("/cosi.resource.State/Destroy") is policy.MethodClass.WRITE
    assert policy.classify("/machine.MachineService/Reboot") is policy.MethodClass.WRITE
    assert policy.classify("/machine.MachineService/Logs") is policy.MethodClass.UNKNOWN


def test_bind_target_never_wildcards_with_siderolink() -> None:
    assert bind_target(siderolink_configured=False, siderolink_address=None) == ListenAll()
    assert bind_target(siderolink_configured=True, siderolink_address=None) == NotListening()
    target = bind_target(
        siderolink_configured=True, siderolink_address="fdae:41e4:649b:9303::7081/64"
    )
    assert target == ListenOn("fdae:41e4:649b:9303::7081")
    assert target.hostport(50000) == "[fdae:41e4:649b:9303::7081]:50000"
    for bad in ("::", "0.0.0.0", "ff02::1", "not-an-ip"):
        with pytest.raises(ValueError, match="listen address"):
            ListenOn(bad)


def test_print_column_paths() -> None:
    data = {"host": "h", "connected": False, "aliases": ["a", "b"], "wg": {"port": 1}}
    assert output.json_path(data, "{.host}") == "h"
    assert output.json_path(data, "{.connected}") == "false"
    assert output.json_path(data, "{.aliases[:]}") == "a b"
    assert output.json_path(data, "{.wg.port}") == "1"
    assert output.json_path(data, "{.missing}") == ""


def test_a_hostile_yaml_spec_is_refused_by_the_client() -> None:
    """`gatekeeper maint get -o yaml` parses what a machine sends: bounded like our files."""
    levels = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    pairs = zip("abcdefgh", "bcdefghi", strict=True)
    levels += [f"&{c} [{', '.join(['*' + p] * 9)}]" for p, c in pairs]
    bomb = "".join(f"x{i}: {level}\n" for i, level in enumerate(levels)) + "y: *i\n"
    resource = resource_pb2.Resource()
    resource.metadata.id = "evil"
    resource.spec.yaml_spec = bomb
    with pytest.raises(ClientError, match=r"^resource 'evil' yaml_spec document 1: invalid YAML: "):
        spec_dict(resource)
    resource.spec.yaml_spec = "host: fd00::1\nconnected: true\n"
    assert spec_dict(resource) == {"host": "fd00::1", "connected": True}
