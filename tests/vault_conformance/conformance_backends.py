"""The backend conformance suite: every vault backend must pass the same tests.

Each test here takes the ``backend`` fixture and runs once per entry in
``BACKEND_FACTORIES``. A factory gets pytest's ``tmp_path`` and returns a
fresh, empty backend; the fixture closes it afterwards.

To plug in a new backend (Swift, S3, ...), write one factory in this file
and add it to ``BACKEND_FACTORIES`` below (the list is read when the fixture
is defined, so append to it here, not from another module), e.g.::

    def _swift(tmp_path: Path) -> Backend:
        url = os.environ.get("RAKSHA_TEST_SWIFT_URL")
        if not url:
            pytest.skip("set RAKSHA_TEST_SWIFT_URL to run the conformance suite against Swift")
        # a fresh container per test, so tests never see each other's objects
        return SwiftBackend(url, container=f"raksha-test-{uuid.uuid4().hex}", create=True)

    BACKEND_FACTORIES = [("local", _local), ("memory", _memory), ("swift", _swift)]

A factory for a remote store should skip (not fail) when the service is not
configured, and should give each test its own empty namespace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from raksha.vault.backends.base import Backend
from raksha.vault.backends.local import LocalBackend
from raksha.vault.backends.memory import MemoryBackend

BackendFactory = Callable[[Path], Backend]


def _local(tmp_path: Path) -> Backend:
    return LocalBackend(tmp_path / "vault", create=True)


def _memory(tmp_path: Path) -> Backend:
    return MemoryBackend()


BACKEND_FACTORIES: list[tuple[str, BackendFactory]] = [
    ("local", _local),
    ("memory", _memory),
]


@pytest.fixture(params=[factory for _, factory in BACKEND_FACTORIES], ids=[n for n, _ in BACKEND_FACTORIES])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    factory: BackendFactory = request.param
    b = factory(tmp_path)
    try:
        yield b
    finally:
        b.close()
