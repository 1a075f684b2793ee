"""Shared fixtures: a network-namespace lab that is always torn down."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from gatekeeper.lab.netns import Lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A Lab (namespaces, veths, processes) closed after the test, pass or fail."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces require CAP_NET_ADMIN and CAP_SYS_ADMIN")
    if shutil.which("ip") is None:
        pytest.skip("ip not found: install the Debian package iproute2")
    if shutil.which("wireguard-go") is None:
        pytest.skip("wireguard-go not found: install the Debian package wireguard-go")
    with Lab() as built:
        yield built
