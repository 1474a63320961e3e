"""Reading blobs out of packs into reused, page-aligned per-thread buffers."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable

from raksha.vault.directio import aligned_span
from raksha.vault.format.index import Location
from raksha.vault.format.pack import pack_key
from raksha.vault.repository import Vault


class BlobReader:
    """``read(loc)``: a blob's bytes, as a view of this thread's buffer (valid until its next read).

    Backends with ``get_range_into`` (the local one: O_DIRECT into the buffer) allocate nothing per
    blob; others fall back to ``Vault.read_blob``.
    """

    def __init__(self, vault: Vault) -> None:
        self._vault = vault
        self._into: Callable[..., memoryview] | None = getattr(vault.backend, "get_range_into", None)
        self._local = threading.local()

    def read(self, loc: Location) -> memoryview | bytes:
        return self.read_range(pack_key(loc.pack_id.hex()), loc.offset, loc.stored_length)

    def read_range(self, key: str, offset: int, length: int) -> memoryview | bytes:
        if self._into is None:
            return self._vault.backend.get_range(key, offset, length)
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        need = aligned_span(offset, length)
        if buf is None or len(buf) < need:
            buf = self._local.buf = mmap.mmap(-1, max(need, 1 << 20))  # anonymous maps are page-aligned
        return self._into(key, offset, length, buf)
