"""The resource types a Gatekeeper machine publishes, and one helper per type to publish it.

Type names, namespaces, ids, YAML keys, field numbers and printed columns are Talos's (see
docs/compatibility.md), so `talosctl get siderolinkstatus` habits carry over.

Sensitive types (the SideroLink config and tunnel, which hold the join token) are published in
full, as Talos does: SideroLink peers are admins and reading them is what the overlay is for.
Everyone else is a reader and is refused them (`PERMISSION_DENIED`), see policy.py.
"""

from __future__ import annotations

import ipaddress
import platform
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from gatekeeper.maintenance.resources import (
    FieldKind,
    PrintColumn,
    Resource,
    ResourceDefinition,
    ResourceStore,
    SpecField,
)

CONFIG_NAMESPACE = "config"
NETWORK_NAMESPACE = "network"
HARDWARE_NAMESPACE = "hardware"
RUNTIME_NAMESPACE = "runtime"

SIDEROLINK_CONFIG_ID = "siderolink"
SIDEROLINK_STATUS_ID = "siderolink-status"
SIDEROLINK_TUNNEL_ID = "siderolink-tunnel"
VERSION_ID = "version"
SYSTEM_INFORMATION_ID = "systeminformation"

OWNER = "gatekeeper.agent"

SIDEROLINK_CONFIG = ResourceDefinition(
    "SiderolinkConfigs.siderolink.talos.dev",
    CONFIG_NAMESPACE,
    print_columns=(
        PrintColumn("API Endpoint", "{.apiEndpoint}"),
        PrintColumn("Tunnel", "{.tunnel}"),
    ),
    sensitive=True,
    proto_fields=(
        SpecField("apiEndpoint", 1),
        SpecField("host", 2),
        SpecField("joinToken", 3),
        SpecField("insecure", 4, FieldKind.BOOL),
        SpecField("tunnel", 5, FieldKind.BOOL),
    ),
)

SIDEROLINK_STATUS = ResourceDefinition(
    "SiderolinkStatuses.siderolink.talos.dev",
    CONFIG_NAMESPACE,
    print_columns=(
        PrintColumn("Host", "{.host}"),
        PrintColumn("Connected", "{.connected}"),
        PrintColumn("Link", "{.linkName}"),
        PrintColumn("gRPC Tunnel", "{.grpcTunnel}"),
    ),
    proto_fields=(
        SpecField("host", 1),
        SpecField("connected", 2, FieldKind.BOOL),
        SpecField("linkName", 3),
        SpecField("grpcTunnel", 4, FieldKind.BOOL),
    ),
)

# Talos publishes it only in tunnel mode. nodeAddress is the virtual [addr]:port that names the
# machine's stream (a netip.AddrPort upstream: common.NetIPPort on the wire).
SIDEROLINK_TUNNEL = ResourceDefinition(
    "SiderolinkTunnels.siderolink.talos.dev",
    CONFIG_NAMESPACE,
    print_columns=(
        PrintColumn("API Endpoint", "{.apiEndpoint}"),
        PrintColumn("Interface name", "{.ifaceName}"),
        PrintColumn("MTU", "{.mtu}"),
        PrintColumn("Node address", "{.nodeAddress}"),
    ),
    sensitive=True,
    proto_fields=(
        SpecField("apiEndpoint", 1),
        SpecField("linkName", 2),
        SpecField("mtu", 3, FieldKind.UINT),
        SpecField("nodeAddress", 4, FieldKind.ADDR_PORT),
    ),
)

LINK_STATUS = ResourceDefinition(
    "LinkStatuses.net.talos.dev",
    NETWORK_NAMESPACE,
    aliases=("link", "links"),
    print_columns=(
        PrintColumn("Type", "{.type}"),
        PrintColumn("Kind", "{.kind}"),
        PrintColumn("Hw Addr", "{.hardwareAddr}"),
        PrintColumn("Oper State", "{.operationalState}"),
        PrintColumn("Link State", "{.linkState}"),
    ),
    # Talos's LinkStatusSpec numbers for the plain scalar fields; enums, flags and hardware
    # addresses have Talos-specific encodings and appear in yaml_spec only.
    proto_fields=(
        SpecField("index", 1, FieldKind.UINT),
        SpecField("linkIndex", 3, FieldKind.UINT),
        SpecField("mtu", 7, FieldKind.UINT),
        SpecField("queueDisc", 8),
        SpecField("kind", 11),
        SpecField("slaveKind", 12),
        SpecField("linkState", 22, FieldKind.BOOL),
    ),
)

# Talos encodes addresses as its own netip messages: AddressStatus is YAML-only here.
ADDRESS_STATUS = ResourceDefinition(
    "AddressStatuses.net.talos.dev",
    NETWORK_NAMESPACE,
    aliases=("address", "addresses"),
    print_columns=(PrintColumn("Address", "{.address}"), PrintColumn("Link", "{.linkName}")),
)

VERSION = ResourceDefinition(
    "Versions.runtime.talos.dev",
    RUNTIME_NAMESPACE,
    print_columns=(PrintColumn("Version", "{.version}"),),
    proto_fields=(SpecField("version", 1),),
)

SYSTEM_INFORMATION = ResourceDefinition(
    "SystemInformations.hardware.talos.dev",
    HARDWARE_NAMESPACE,
    aliases=("systeminformation",),
    print_columns=(
        PrintColumn("Manufacturer", "{.manufacturer}"),
        PrintColumn("ProductName", "{.productName}"),
        PrintColumn("Version", "{.version}"),
        PrintColumn("SerialNumber", "{.serialnumber}"),
        PrintColumn("UUID", "{.uuid}"),
        PrintColumn("WakeUpType", "{.wakeUpType}"),
        PrintColumn("SKUNumber", "{.skuNumber}"),
    ),
    proto_fields=(
        SpecField("manufacturer", 1),
        SpecField("productName", 2),
        SpecField("version", 3),
        SpecField("serialnumber", 4),
        SpecField("uuid", 5),
        SpecField("wakeUpType", 6),
        SpecField("skuNumber", 7),
    ),
)

CATALOG: tuple[ResourceDefinition, ...] = (
    SIDEROLINK_CONFIG,
    SIDEROLINK_STATUS,
    SIDEROLINK_TUNNEL,
    LINK_STATUS,
    ADDRESS_STATUS,
    VERSION,
    SYSTEM_INFORMATION,
)


def new_store() -> ResourceStore:
    """A store with every catalog type defined (and listed in ResourceDefinitions)."""
    return ResourceStore(CATALOG)


# -- SideroLink ----------------------------------------------------------------------------


def publish_siderolink_config(
    store: ResourceStore,
    *,
    api_endpoint: str,
    host: str,
    join_token: str | None,
    insecure: bool,
    tunnel: bool,
) -> Resource:
    """SiderolinkConfigs (config/siderolink): the configured API, join token included.

    Sensitive: only admins (SideroLink peers) can read it, and they get it whole, as in Talos.
    """
    spec = {
        "apiEndpoint": api_endpoint,
        "host": host,
        "joinToken": join_token or "",
        "insecure": insecure,
        "tunnel": tunnel,
    }
    return store.put(
        CONFIG_NAMESPACE, SIDEROLINK_CONFIG.type, SIDEROLINK_CONFIG_ID, spec, owner=OWNER
    )


def clear_siderolink_config(store: ResourceStore) -> None:
    """SideroLink is no longer configured: drop its config, status and tunnel."""
    store.delete(CONFIG_NAMESPACE, SIDEROLINK_CONFIG.type, SIDEROLINK_CONFIG_ID)
    store.delete(CONFIG_NAMESPACE, SIDEROLINK_STATUS.type, SIDEROLINK_STATUS_ID)
    clear_siderolink_tunnel(store)


def publish_siderolink_tunnel(
    store: ResourceStore, *, api_endpoint: str, link_name: str, mtu: int, node_address: str
) -> Resource:
    """SiderolinkTunnels (config/siderolink-tunnel): in tunnel mode only, as in Talos.

    `api_endpoint` is the configured API URL (it carries the join token: sensitive);
    `node_address` the virtual `[addr]:port` from the Provision reply.
    """
    spec = {
        "apiEndpoint": api_endpoint,
        "linkName": link_name,
        "mtu": mtu,
        "nodeAddress": node_address,
    }
    return store.put(
        CONFIG_NAMESPACE, SIDEROLINK_TUNNEL.type, SIDEROLINK_TUNNEL_ID, spec, owner=OWNER
    )


def clear_siderolink_tunnel(store: ResourceStore) -> None:
    store.delete(CONFIG_NAMESPACE, SIDEROLINK_TUNNEL.type, SIDEROLINK_TUNNEL_ID)


def publish_siderolink_status(
    store: ResourceStore,
    *,
    host: str,
    connected: bool,
    link_name: str,
    tunnel: bool,
) -> Resource:
    """SiderolinkStatuses (config/siderolink-status): host, connected, link name, tunnel mode.

    `host` is the bare host name or address (no brackets, no port), as Talos stores it.
    """
    spec = {"host": host, "connected": connected, "linkName": link_name, "grpcTunnel": tunnel}
    return store.put(
        CONFIG_NAMESPACE, SIDEROLINK_STATUS.type, SIDEROLINK_STATUS_ID, spec, owner=OWNER
    )


# -- network ---------------------------------------------------------------------------------


def publish_link_status(
    store: ResourceStore,
    name: str,
    *,
    index: int,
    mtu: int,
    up: bool,
    kind: str = "wireguard",
    link_type: str = "none",
    flags: Sequence[str] = (),
    hardware_addr: str = "",
    queue_disc: str = "",
    wireguard_public_key: str | None = None,
    wireguard_listen_port: int | None = None,
) -> Resource:
    """LinkStatuses (network/<name>): the overlay link as Talos describes links.

    `up` drives operationalState and linkState; the WireGuard public key (never the private
    one) and listen port go under `wireguard` when given.
    """
    spec: dict[str, Any] = {
        "index": index,
        "type": link_type,
        "linkIndex": 0,
        "flags": ",".join(flags),
        "hardwareAddr": hardware_addr,
        "broadcastAddr": "",
        "mtu": mtu,
        "queueDisc": queue_disc,
        "operationalState": "up" if up else "down",
        "kind": kind,
        "slaveKind": "",
        "linkState": up,
        "port": "Other",
        "duplex": "Unknown",
    }
    if wireguard_public_key is not None or wireguard_listen_port is not None:
        wg: dict[str, Any] = {}
        if wireguard_public_key is not None:
            wg["publicKey"] = wireguard_public_key
        if wireguard_listen_port is not None:
            wg["listenPort"] = wireguard_listen_port
        spec["wireguard"] = wg
    return store.put(NETWORK_NAMESPACE, LINK_STATUS.type, name, spec, owner=OWNER)


def remove_link_status(store: ResourceStore, name: str) -> None:
    store.delete(NETWORK_NAMESPACE, LINK_STATUS.type, name)
    for r in store.list(NETWORK_NAMESPACE, ADDRESS_STATUS.type):
        if r.spec.get("linkName") == name:
            store.delete(NETWORK_NAMESPACE, ADDRESS_STATUS.type, r.id)


def address_status_id(link_name: str, address: str) -> str:
    return f"{link_name}/{address}"


def publish_addresses(
    store: ResourceStore,
    link_name: str,
    addresses: Iterable[str],
    *,
    link_index: int = 0,
) -> list[Resource]:
    """AddressStatuses (network/<link>/<addr/len>) for one link: exactly these, stale ones go.

    Addresses are prefixes as the kernel shows them (`fdae:...:7081/64`); a bare address is
    taken as a host prefix.
    """
    wanted: dict[str, dict[str, Any]] = {}
    for text in addresses:
        iface = ipaddress.ip_interface(text)
        prefix = iface.with_prefixlen
        family = "inet6" if iface.version == 6 else "inet4"
        scope = "link" if iface.ip.is_link_local else ("host" if iface.ip.is_loopback else "global")
        wanted[address_status_id(link_name, prefix)] = {
            "address": prefix,
            "local": str(iface.ip),
            "linkIndex": link_index,
            "linkName": link_name,
            "family": family,
            "scope": scope,
            "flags": "permanent",
        }
    for r in store.list(NETWORK_NAMESPACE, ADDRESS_STATUS.type):
        if r.spec.get("linkName") == link_name and r.id not in wanted:
            store.delete(NETWORK_NAMESPACE, ADDRESS_STATUS.type, r.id)
    return [
        store.put(NETWORK_NAMESPACE, ADDRESS_STATUS.type, rid, spec, owner=OWNER)
        for rid, spec in wanted.items()
    ]


# -- runtime and hardware ------------------------------------------------------------------


def publish_version(store: ResourceStore, tag: str) -> Resource:
    """Versions (runtime/version): the agent's version tag."""
    return store.put(RUNTIME_NAMESPACE, VERSION.type, VERSION_ID, {"version": tag}, owner=OWNER)


def publish_system_information(
    store: ResourceStore,
    *,
    uuid: str,
    manufacturer: str = "",
    product_name: str = "",
    version: str = "",
    serial_number: str = "",
    wake_up_type: str = "",
    sku_number: str = "",
) -> Resource:
    """SystemInformations (hardware/systeminformation): SMBIOS identity, the node UUID first.

    Empty fields are left out of the YAML, as Talos's omitempty tags do.
    """
    spec = {
        "manufacturer": manufacturer,
        "productName": product_name,
        "version": version,
        "serialnumber": serial_number,
        "uuid": uuid,
        "wakeUpType": wake_up_type,
        "skuNumber": sku_number,
    }
    spec = {k: v for k, v in spec.items() if v}
    return store.put(
        HARDWARE_NAMESPACE, SYSTEM_INFORMATION.type, SYSTEM_INFORMATION_ID, spec, owner=OWNER
    )


def runtime_version() -> str:
    """What goes where Talos reports the Go version, e.g. 'CPython 3.11.7'."""
    return f"{platform.python_implementation()} {sys.version.split()[0]}"
