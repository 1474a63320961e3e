"""Fixtures shared by the tests that drive real guests through libvirtd."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def conn() -> Iterator[Any]:
    """A connection to a libvirtd started for the tests (scripts/start-libvirtd.sh)."""
    libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")
    if os.geteuid() != 0:
        pytest.skip("starting libvirtd needs root")
    from libvirt_guests import start_libvirtd

    c = libvirt.open(start_libvirtd())
    yield c
    c.close()
