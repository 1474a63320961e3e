"""Reading blobs and chunks out of packs into reused, page-aligned per-thread buffers."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Mapping, Sequence

from raksha.domain.errors import ChunkMissing, NotFound
from raksha.vault.directio import AlignedBuffers, aligned_span
from raksha.vault.format.blob import BlobDecoder
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.deltas import Layer
from raksha.vault.format.index import Location
from raksha.vault.format.manifest import Manifest
from raksha.vault.format.pack import pack_key
from raksha.vault.malloc import anonymous_map
from raksha.vault.repository import Vault

READ_AHEAD = 1 << 20  # of a pack, for a chunk's small blobs (layers): see BlobReader


class BlobReader:
    """``read(loc)``: a blob's bytes, as a view of this thread's buffer (valid until its next read).

    Backends with ``get_range_into`` (the local one: O_DIRECT into the buffer) allocate nothing per
    blob; others fall back to ``Vault.read_blob``.
    """

    def __init__(self, vault: Vault, *, read_ahead: int = 0) -> None:
        self._vault = vault
        self._into: Callable[..., memoryview] | None = getattr(vault.backend, "get_range_into", None)
        self._local = threading.local()
        # Reads shorter than this read this much of the pack and keep it for the thread's next reads
        # (packs never change): a layered restore's small layer blobs lie side by side in their packs,
        # one O_DIRECT read each was one random device read each.
        self._read_ahead = read_ahead

    def read(self, loc: Location) -> memoryview | bytes:
        return self.read_range(pack_key(loc.pack_id.hex()), loc.offset, loc.stored_length)

    def read_range(self, key: str, offset: int, length: int) -> memoryview | bytes:
        if self._into is None:
            return self._vault.backend.get_range(key, offset, length)
        held: tuple[str, int, memoryview] | None = getattr(self._local, "held", None)
        if held is not None and held[0] == key and held[1] <= offset and offset + length <= held[1] + len(held[2]):
            return held[2][offset - held[1] : offset - held[1] + length]
        span = self._read_ahead if length < self._read_ahead else length
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        need = aligned_span(offset, span)
        if buf is None or len(buf) < need:
            buf = self._local.buf = anonymous_map(max(need, 1 << 20))  # anonymous maps are page-aligned
        self._local.held = None  # the buffer is being overwritten
        view = self._into(key, offset, span, buf)  # shorter at the pack's end
        if span == length:
            return view
        self._local.held = (key, offset, view)
        return view[:length]


class ChunkReader:
    """A manifest's chunks out of the vault into caller buffers, whole or as base + delta layers
    (format.md §8.1), every blob checked against its id. Thread-safe: buffers and decoders per thread."""

    def __init__(self, vault: Vault, locations: Mapping[bytes, Location], chunk_size: int, *,
                 read_ahead: int = READ_AHEAD) -> None:
        self._blobs = BlobReader(vault, read_ahead=read_ahead)
        self._crypto = vault.crypto
        self._locations = locations
        self._chunk_size = chunk_size
        self._layer_buffers = AlignedBuffers(chunk_size)
        self._zero = bytes(chunk_size)
        self._local = threading.local()

    def decoder(self) -> BlobDecoder:
        """This thread's decoder."""
        decoder: BlobDecoder | None = getattr(self._local, "decoder", None)
        if decoder is None:
            decoder = self._local.decoder = BlobDecoder(self._crypto, self._chunk_size)
        return decoder

    def blob_into(self, blob_id: bytes, raw_length: int, out: memoryview, *, what: str) -> memoryview:
        """Blob ``blob_id`` decoded into ``out``: ChunkMissing if the vault lacks it, VaultCorrupt if damaged."""
        loc = self._locations.get(blob_id)
        if loc is None:
            raise ChunkMissing(f"{what}: chunk {blob_id.hex()} is in no index", chunks=[blob_id.hex()])
        try:
            blob = self._blobs.read(loc)
        except NotFound:
            key = pack_key(loc.pack_id.hex())
            raise ChunkMissing(f"{what}: chunk {blob_id.hex()} is missing (its pack {key} is gone)",
                               chunks=[blob_id.hex()], object=key) from None
        return self.decoder().decode_into(blob, blob_id, raw_length, out,
                                          what=f"{pack_key(loc.pack_id.hex())}@{loc.offset}")

    def chunk_into(self, manifest: Manifest, index: int, out: memoryview) -> None:
        """Chunk ``index`` of ``manifest`` into ``out`` (its length): the base, then each layer in order."""
        self.layered_into(manifest.chunk_ids[index], manifest.deltas.get(index, ()), out,
                          what=f"backup {manifest.id} chunk {index}")

    def layered_into(self, base: bytes, layers: Sequence[Layer], out: memoryview, *, what: str) -> None:
        """Chunk ``base`` with ``layers`` applied in order, into ``out`` (its length)."""
        length = len(out)
        if base == ZERO_ID:
            out[:] = self._zero[:length]
        else:
            self.blob_into(base, length, out, what=what)
        self.layers_into(layers, out, what=what)

    def layers_into(self, layers: Sequence[Layer], out: memoryview, *, what: str) -> None:
        """``layers`` applied in order onto what ``out`` holds (only their ranges are written)."""
        for layer in layers:
            if layer.blob_id == ZERO_ID:
                for off, n in layer.ranges:
                    out[off : off + n] = self._zero[:n]
                continue
            data = self.blob_into(layer.blob_id, layer.length, memoryview(self._layer_buffers.get()), what=what)
            pos = 0
            for off, n in layer.ranges:
                out[off : off + n] = data[pos : pos + n]
                pos += n
