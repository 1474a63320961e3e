"""Sealed metadata objects (format.md §12): magic | version | flags | body."""

from __future__ import annotations

import blake3
import zstandard

from raksha.domain.errors import VaultCorrupt, VaultFormatUnsupported
from raksha.vault.format.constants import FLAG_ENCRYPTED, ID_SIZE, OBJECT_VERSION
from raksha.vault.format.crypto import Crypto

_HEAD = 6
# Metadata objects are small and rare next to chunks: a fresh (de)compressor per
# call is cheap and keeps this thread-safe (zstandard objects are not).
_LEVEL = 3


def seal_object(magic: bytes, payload: bytes, crypto: Crypto, aad: bytes = b"") -> bytes:
    compressed = zstandard.ZstdCompressor(level=_LEVEL).compress(payload)
    if crypto.encrypted:
        body = crypto.seal(compressed, magic + aad)
        return magic + bytes([OBJECT_VERSION, FLAG_ENCRYPTED]) + body
    return magic + bytes([OBJECT_VERSION, 0]) + compressed + blake3.blake3(compressed).digest()


def open_object(data: bytes, magic: bytes, crypto: Crypto, *, what: str, aad: bytes = b"") -> bytes:
    if len(data) < _HEAD or data[:4] != magic:
        raise VaultCorrupt(f"{what}: not a {magic.decode()} object (bad magic or truncated)", object=what)
    version, flags = data[4], data[5]
    if version != OBJECT_VERSION:
        raise VaultFormatUnsupported(
            f"{what}: object version {version} is not supported (this Raksha reads {OBJECT_VERSION})",
            object=what,
        )
    if flags & ~FLAG_ENCRYPTED:
        # Version 1 defines bit 0 only, and the header is outside the checksum: other bits mean damage.
        raise VaultCorrupt(f"{what}: unknown flags {flags:#04x} (damaged)", object=what)
    body = data[_HEAD:]
    encrypted = bool(flags & FLAG_ENCRYPTED)
    if encrypted != crypto.encrypted:
        raise VaultCorrupt(f"{what}: encryption flag does not match the vault", object=what)
    if encrypted:
        compressed = crypto.open(body, magic + aad, what=what)
    else:
        if len(body) < ID_SIZE:
            raise VaultCorrupt(f"{what}: truncated", object=what)
        compressed, digest = body[:-ID_SIZE], body[-ID_SIZE:]
        if blake3.blake3(compressed).digest() != digest:
            raise VaultCorrupt(f"{what}: checksum mismatch (damaged)", object=what)
    try:
        return zstandard.ZstdDecompressor().decompress(compressed)
    except zstandard.ZstdError as exc:
        raise VaultCorrupt(f"{what}: cannot decompress: {exc}", object=what) from None
