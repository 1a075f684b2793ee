"""Who may call what: roles from the peer address, and which methods exist for which role.

Pure functions over the strings gRPC hands us (`context.peer()`, the full method name), so the
rules are tested without a network.
"""

from __future__ import annotations

import enum
import ipaddress

from gatekeeper.netaddr import grpc_peer_address

NOT_AUTHORIZED = "not authorized"
WRITE_DENIED = "write access is not allowed"
OVERLAY_ONLY = "the maintenance API answers only over SideroLink"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Role(enum.Enum):
    ADMIN = "admin"
    READER = "reader"


def peer_address(peer: str) -> IPAddress | None:
    """The IP address in a gRPC peer string ('ipv6:[fd00::1]:5000', 'ipv4:10.0.0.1:5000').

    IPv4-mapped IPv6 addresses are returned as IPv4; anything else gives None. The one
    parser of peer strings is gatekeeper.netaddr.grpc_peer_address.
    """
    return grpc_peer_address(peer)


def role_for(peer: str, overlay_prefix: IPNetwork | None) -> Role:
    """Admin when the peer's source address lies in the overlay prefix; reader otherwise."""
    addr = peer_address(peer)
    if addr is None or overlay_prefix is None or addr.version != overlay_prefix.version:
        return Role.READER
    return Role.ADMIN if addr in overlay_prefix else Role.READER


class MethodClass(enum.Enum):
    SERVED = "served"
    WRITE = "write"
    UNKNOWN = "unknown"


SERVED_METHODS = frozenset(
    {
        "/machine.MachineService/Version",
        "/cosi.resource.State/Get",
        "/cosi.resource.State/List",
        "/cosi.resource.State/Watch",
    }
)

# Methods that would change the machine: refused as writes rather than "unknown", so a
# client learns that the API exists but is read-only.
WRITE_METHODS = frozenset(
    {
        "/cosi.resource.State/Create",
        "/cosi.resource.State/Update",
        "/cosi.resource.State/Destroy",
        "/cosi.resource.State/Teardown",
        "/cosi.resource.State/TeardownAndDestroy",
    }
    | {
        f"/machine.MachineService/{name}"
        for name in (
            "ApplyConfiguration",
            "Bootstrap",
            "EtcdForfeitLeadership",
            "EtcdLeaveCluster",
            "EtcdRecover",
            "EtcdRemoveMember",
            "EtcdRemoveMemberByID",
            "ImageImport",
            "ImagePull",
            "MetaDelete",
            "MetaWrite",
            "Reboot",
            "Reset",
            "Restart",
            "Rollback",
            "ServiceRestart",
            "ServiceStart",
            "ServiceStop",
            "Shutdown",
            "Upgrade",
        )
    }
)


def classify(method: str) -> MethodClass:
    if method in SERVED_METHODS:
        return MethodClass.SERVED
    if method in WRITE_METHODS:
        return MethodClass.WRITE
    return MethodClass.UNKNOWN


def unimplemented_message(method: str) -> str:
    return (
        f"method {method or '(none)'} is not available on the maintenance API "
        "(served: MachineService/Version and read-only COSI State Get, List, Watch)"
    )
