"""Blobs: one chunk as stored in a pack (format.md §5).

``encode_blob``/``decode_blob`` return new bytes and suit occasional use. The engine's hot
loops use ``BlobEncoder``/``BlobDecoder`` instead: one per thread, they write into buffers
reused for every chunk, so a backup or restore does not allocate (and page-fault in) several
fresh chunk-sized buffers per chunk. Both produce and accept exactly the same blobs.
"""

from __future__ import annotations

import zstandard

from raksha.domain.errors import VaultCorrupt
from raksha.vault.format.constants import BLOB_RAW, BLOB_ZSTD, NONCE_SIZE, TAG_SIZE
from raksha.vault.format.crypto import Crypto
from raksha.vault.malloc import POOL, anonymous_map

Buffer = bytes | bytearray | memoryview

# Incompressibility probe (a writer policy, format.md §5): a few small samples spread over the
# chunk are compressed first; when none of them shrinks by PROBE_MIN_GAIN the chunk is stored raw
# without compressing all of it. zstd -1 gives random data back about 0.03% larger.
PROBE_SAMPLES = 4
PROBE_SAMPLE_SIZE = 4096
PROBE_MIN_GAIN = 0.03
# Smaller data (an incremental's layers of ~100 kB, chunks of small-chunk vaults) is compressed whole: zstd
# -1 gives random data up in about the time the four samples take (64 KiB: 13 us against 13; 100 KiB: 17
# against 15; 256 KiB: 47 against 15), and each sample is a call that lets go of the GIL and must win it
# back. 200 random 100 KiB layers of a live VM's incremental: the pipeline took 54 ms (median of 14)
# against 63 ms probed, on 2 cores shared with the VM's QEMU.
PROBE_MIN_LENGTH = 128 << 10


def encode_blob(data: bytes, chunk_id: bytes, crypto: Crypto, compressor: zstandard.ZstdCompressor) -> bytes:
    """Compress if it pays, then seal. ``compressor`` must belong to the calling thread."""
    compressed = compressor.compress(data)
    inner = bytes([BLOB_ZSTD]) + compressed if len(compressed) < len(data) else bytes([BLOB_RAW]) + data
    return crypto.seal(inner, chunk_id)


def looks_incompressible(data: Buffer, compressor: zstandard.ZstdCompressor) -> bool:
    """True when every probe sample compresses by less than PROBE_MIN_GAIN (data of PROBE_MIN_LENGTH and up)."""
    view = memoryview(data)
    n = len(view)
    if n < PROBE_MIN_LENGTH:
        return False  # small: just compress it
    step = n // PROBE_SAMPLES
    limit = PROBE_SAMPLE_SIZE * (1 - PROBE_MIN_GAIN)
    for i in range(PROBE_SAMPLES):
        # Samples from the middle of each quarter: not the starts, where layouts put headers.
        start = i * step + (step - PROBE_SAMPLE_SIZE) // 2
        if len(compressor.compress(view[start : start + PROBE_SAMPLE_SIZE])) < limit:
            return False
    return True


class BlobEncoder:
    """Encodes chunks of up to ``max_length`` bytes into reused buffers. Not thread-safe: one per thread.

    The returned view is valid until the next ``encode``.
    """

    def __init__(self, crypto: Crypto, level: int, max_length: int, *, probe: bool = True) -> None:
        self._crypto = crypto
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._probe = probe
        # Anonymous maps, not bytearrays: their pages are touched only as far as blobs fill them, and
        # not zeroed first (an incremental of 100 kB layers touched 2 MiB per thread, in page faults).
        self._inner = POOL.take(1 + max_length)
        self._sealed = POOL.take(NONCE_SIZE + 1 + max_length + TAG_SIZE) if crypto.encrypted else None
        self._released = False
        self.stored_raw = 0  # chunks stored uncompressed (probe or no gain)
        self.probe_skipped = 0  # of those, chunks the probe kept from being compressed at all

    def release(self) -> None:
        """Give the buffers to the next encoder of the process; this one must not be used again."""
        if not self._released:
            self._released = True
            POOL.give(*(m for m in (self._inner, self._sealed) if m is not None))

    def encode(self, data: Buffer, chunk_id: bytes) -> memoryview:
        if self._released:
            raise RuntimeError("BlobEncoder used after release()")  # its buffers are another's now
        n = len(data)
        inner = memoryview(self._inner)
        kind = BLOB_RAW
        if self._probe and looks_incompressible(data, self._compressor):
            self.probe_skipped += 1
        else:
            compressed = self._compressor.compress(data)
            if len(compressed) < n:
                kind, n = BLOB_ZSTD, len(compressed)
                inner[1 : 1 + n] = compressed
        if kind == BLOB_RAW:
            inner[1 : 1 + n] = data
            self.stored_raw += 1
        inner[0] = kind
        if self._sealed is None:
            return inner[: 1 + n]
        return self._crypto.seal_into(inner[: 1 + n], chunk_id, self._sealed)


def decode_blob(
    blob: bytes,
    chunk_id: bytes,
    raw_length: int,
    crypto: Crypto,
    decompressor: zstandard.ZstdDecompressor,
    *,
    what: str,
) -> bytes:
    """Open, decompress and check a blob against its id; any mismatch is VAULT_CORRUPT."""
    inner = crypto.open(blob, chunk_id, what=what)
    if not inner:
        raise VaultCorrupt(f"{what}: empty blob", object=what)
    kind, payload = inner[0], inner[1:]
    if kind == BLOB_RAW:
        data = payload
    elif kind == BLOB_ZSTD:
        try:
            data = decompressor.decompress(payload, max_output_size=raw_length)
        except zstandard.ZstdError as exc:
            raise VaultCorrupt(f"{what}: cannot decompress: {exc}", object=what) from None
    else:
        raise VaultCorrupt(f"{what}: unknown blob type {kind}", object=what)
    if len(data) != raw_length or crypto.chunk_id(data) != chunk_id:
        raise VaultCorrupt(f"{what}: content does not match chunk id {chunk_id.hex()}", object=what)
    return data


class BlobDecoder:
    """Opens, decompresses and checks blobs into caller-given buffers. Not thread-safe: one per thread."""

    def __init__(self, crypto: Crypto, max_length: int) -> None:
        self._crypto = crypto
        self._decompressor = zstandard.ZstdDecompressor()
        self._max_blob = crypto.sealed_size(1 + max_length)
        self._inner = anonymous_map(1 + max_length) if crypto.encrypted else None  # see BlobEncoder

    def decode_into(self, blob: Buffer, chunk_id: bytes, raw_length: int, out: memoryview, *, what: str) -> memoryview:
        """Decode ``blob`` into ``out[:raw_length]`` and return that view; any mismatch is VAULT_CORRUPT."""
        if len(blob) > self._max_blob:
            raise VaultCorrupt(f"{what}: blob longer than any chunk of this vault", object=what)
        if self._inner is None:
            inner = memoryview(blob)
        else:
            inner = self._crypto.open_into(blob, chunk_id, self._inner, what=what)
        if not inner:
            raise VaultCorrupt(f"{what}: empty blob", object=what)
        kind, payload = inner[0], inner[1:]
        data = out[:raw_length]
        if len(data) != raw_length:
            raise ValueError("output buffer shorter than the chunk")
        if kind == BLOB_RAW:
            if len(payload) != raw_length:
                raise VaultCorrupt(f"{what}: content does not match chunk id {chunk_id.hex()}", object=what)
            data[:] = payload
        elif kind == BLOB_ZSTD:
            try:
                data[:] = self._decompressor.decompress(payload, max_output_size=raw_length)
            except zstandard.ZstdError as exc:
                raise VaultCorrupt(f"{what}: cannot decompress: {exc}", object=what) from None
            except ValueError:  # the frame holds another length than the chunk's
                raise VaultCorrupt(f"{what}: content does not match chunk id {chunk_id.hex()}", object=what) from None
        else:
            raise VaultCorrupt(f"{what}: unknown blob type {kind}", object=what)
        if self._crypto.chunk_id(data) != chunk_id:
            raise VaultCorrupt(f"{what}: content does not match chunk id {chunk_id.hex()}", object=what)
        return data
