"""Choosing the WireGuard backend at start-up: kernel when it exists, else wireguard-go."""

from __future__ import annotations

import errno
import os

from gatekeeper.wireguard import rtnl
from gatekeeper.wireguard.backend import Backend, WireGuardError

PREFERENCES = ("auto", "kernel", "userspace")


def _kernel_backend() -> Backend:
    # Each backend is imported only once it is chosen: the userspace agent never needs the
    # kernel's codec, and the kernel one never needs wireguard-go's UAPI (about 0.15 s of
    # the VM guest's start-up under emulation).
    from gatekeeper.wireguard.kernel import KernelBackend

    return KernelBackend()


def _userspace_backend() -> Backend:
    from gatekeeper.wireguard.userspace import UserspaceBackend

    backend = UserspaceBackend()
    backend.preflight()
    return backend


def kernel_wireguard() -> tuple[bool, str]:
    """Whether this kernel speaks WireGuard's generic netlink family, and why not if it does not.

    Looking the family up also makes the kernel load the module when it can.
    """
    try:
        rtnl.genl_family_id("wireguard")
    except rtnl.NetlinkError as exc:
        if exc.code == errno.ENOENT:
            return False, "generic netlink family 'wireguard' missing"
        return False, f"generic netlink family 'wireguard' lookup failed: {os.strerror(exc.code)}"
    except OSError as exc:
        return False, f"cannot query generic netlink: {exc.strerror or exc}"
    return True, "generic netlink family 'wireguard' present"


def select_backend(preference: str = "auto") -> tuple[Backend, str]:
    """The backend to use and a one-line reason for the log.

    "kernel" and "userspace" insist (WireGuardError when unusable); "auto" takes the kernel
    when it has WireGuard, and wireguard-go otherwise.
    """
    if preference not in PREFERENCES:
        raise WireGuardError(
            f"unknown WireGuard backend {preference!r}: choose one of {', '.join(PREFERENCES)}"
        )
    if preference == "userspace":
        return _userspace_backend(), "userspace wireguard-go, as configured"
    available, why = kernel_wireguard()
    if preference == "kernel":
        if not available:
            raise WireGuardError(
                f"kernel WireGuard not available ({why}): load the wireguard module "
                "or use 'userspace'"
            )
        return _kernel_backend(), f"kernel WireGuard, as configured ({why})"
    if available:
        return _kernel_backend(), f"kernel WireGuard available ({why})"
    reason = f"kernel WireGuard not available ({why})"
    try:
        backend = _userspace_backend()
    except WireGuardError as exc:
        raise WireGuardError(f"{reason}, and {exc}") from None
    return backend, f"{reason}; using userspace wireguard-go"
