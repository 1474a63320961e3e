"""Blobs: one chunk as stored in a pack (format.md §5)."""

from __future__ import annotations

import zstandard

from raksha.domain.errors import VaultCorrupt
from raksha.vault.format.constants import BLOB_RAW, BLOB_ZSTD
from raksha.vault.format.crypto import Crypto


def encode_blob(data: bytes, chunk_id: bytes, crypto: Crypto, compressor: zstandard.ZstdCompressor) -> bytes:
    """Compress if it pays, then seal. ``compressor`` must belong to the calling thread."""
    compressed = compressor.compress(data)
    inner = bytes([BLOB_ZSTD]) + compressed if len(compressed) < len(data) else bytes([BLOB_RAW]) + data
    return crypto.seal(inner, chunk_id)


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
