"""Every WireGuard backend passes the same contract (gatekeeper.wireguard.contract).

Each check runs on a thread inside a fresh lab namespace; the kernel backend joins BACKENDS
when it exists (and the VM runs contract.CHECKS against kernel WireGuard directly).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gatekeeper.lab.netns import Lab
from gatekeeper.lab.nsthread import NamespaceThread
from gatekeeper.wireguard import contract
from gatekeeper.wireguard.backend import Backend
from gatekeeper.wireguard.userspace import UserspaceBackend

pytestmark = pytest.mark.netns

BACKENDS: dict[str, Callable[[], Backend]] = {"userspace": UserspaceBackend}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("check", contract.CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_backend_contract(lab: Lab, backend: str, check: contract.Check) -> None:
    ns = lab.namespace("c")
    with NamespaceThread(ns.name) as inside:
        inside.call(check, BACKENDS[backend](), lab.name("wg"))
