"""Choosing the WireGuard backend at start-up: kernel when it exists, else wireguard-go."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from gatekeeper.wireguard import iplink
from gatekeeper.wireguard.backend import Backend, WireGuardError
from gatekeeper.wireguard.kernel import KernelBackend
from gatekeeper.wireguard.userspace import UserspaceBackend

PREFERENCES = ("auto", "kernel", "userspace")

# None would leave only wireguard-go (auto falls back to it, 'kernel' refuses).
KERNEL_BACKEND: Callable[[], Backend] | None = KernelBackend


def kernel_wireguard() -> tuple[bool, str]:
    """Whether this kernel speaks WireGuard's generic netlink family, and why not if it does not.

    Looking the family up also makes the kernel load the module when it can.
    """

    def probe() -> tuple[bool, str]:
        from pyroute2 import WireGuard
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            WireGuard().close()
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:
                return False, "generic netlink family 'wireguard' missing"
            return (
                False,
                f"generic netlink family 'wireguard' lookup failed: {os.strerror(exc.code)}",
            )
        except OSError as exc:
            return False, f"cannot query generic netlink: {exc.strerror or exc}"
        return True, "generic netlink family 'wireguard' present"

    return iplink.off_loop(probe)


def select_backend(preference: str = "auto") -> tuple[Backend, str]:
    """The backend to use and a one-line reason for the log.

    "kernel" and "userspace" insist (WireGuardError when unusable); "auto" takes the kernel
    when it has WireGuard and the kernel backend exists, and wireguard-go otherwise.
    """
    if preference not in PREFERENCES:
        raise WireGuardError(
            f"unknown WireGuard backend {preference!r}: choose one of {', '.join(PREFERENCES)}"
        )
    if preference == "userspace":
        backend = UserspaceBackend()
        backend.preflight()
        return backend, "userspace wireguard-go, as configured"
    available, why = kernel_wireguard()
    if preference == "kernel":
        if KERNEL_BACKEND is None:
            raise WireGuardError(
                "the kernel WireGuard backend is not implemented yet: use 'userspace' or 'auto'"
            )
        if not available:
            raise WireGuardError(
                f"kernel WireGuard not available ({why}): load the wireguard module "
                "or use 'userspace'"
            )
        return KERNEL_BACKEND(), f"kernel WireGuard, as configured ({why})"
    if available and KERNEL_BACKEND is not None:
        return KERNEL_BACKEND(), f"kernel WireGuard available ({why})"
    if available:
        reason = "kernel WireGuard available but its backend is not implemented yet"
    else:
        reason = f"kernel WireGuard not available ({why})"
    backend = UserspaceBackend()
    try:
        backend.preflight()
    except WireGuardError as exc:
        raise WireGuardError(f"{reason}, and {exc}") from None
    return backend, f"{reason}; using userspace wireguard-go"
