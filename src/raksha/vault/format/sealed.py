"""Sealed metadata objects (format.md §12): magic | version | flags | body."""

from __future__ import annotations

from collections.abc import Sequence

import blake3
import zstandard

from raksha.domain.errors import VaultCorrupt, VaultFormatUnsupported
from raksha.vault.format.constants import FLAG_ENCRYPTED, ID_SIZE, OBJECT_VERSION
from raksha.vault.format.crypto import Crypto

_HEAD = 6
# Metadata objects are small and rare next to chunks: a fresh (de)compressor per
# call is cheap and keeps this thread-safe (zstandard objects are not).
_LEVEL = 3


Buffer = bytes | bytearray | memoryview
# A zstd frame cannot expand more than about 32,000-fold (a 3-byte RLE block header and one byte make up
# to 128 KiB); a frame claiming more is damaged, and is not allowed to make us allocate that much.
MAX_EXPANSION = 1 << 16


def seal_object(magic: bytes, payload: Buffer | Sequence[Buffer], crypto: Crypto, aad: bytes = b"") -> bytes:
    """Compress and seal ``payload``: one buffer, or several compressed one after another as if joined
    (no copy of a 1 TiB disk's 32 MB of chunk ids just to join them to a manifest's head)."""
    parts = [payload] if isinstance(payload, bytes | bytearray | memoryview) else payload
    views = [memoryview(p).cast("B") for p in parts]
    compressor = zstandard.ZstdCompressor(level=_LEVEL).compressobj(size=sum(v.nbytes for v in views))
    compressed = b"".join([*(compressor.compress(v) for v in views), compressor.flush()])
    if crypto.encrypted:
        body = crypto.seal(compressed, magic + aad)
        return magic + bytes([OBJECT_VERSION, FLAG_ENCRYPTED]) + body
    return magic + bytes([OBJECT_VERSION, 0]) + compressed + blake3.blake3(compressed).digest()


def open_object(data: bytes, magic: bytes, crypto: Crypto, *, what: str, aad: bytes = b"") -> bytes:
    """The whole payload of a sealed object."""
    return open_payload(data, magic, crypto, what=what, aad=aad).read_all()


def open_payload(data: bytes, magic: bytes, crypto: Crypto, *, what: str, aad: bytes = b"") -> Payload:
    """A sealed object's payload, checked and decrypted, decompressed as it is read."""
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
    return Payload(compressed, what)


class Payload:
    """A decompressing reader that gives exactly what is asked for or raises VAULT_CORRUPT."""

    def __init__(self, compressed: bytes, what: str) -> None:
        self.what = what
        try:
            size = zstandard.frame_content_size(compressed)
        except zstandard.ZstdError as exc:
            raise VaultCorrupt(f"{what}: cannot decompress: {exc}", object=what) from None
        if not 0 <= size <= len(compressed) * MAX_EXPANSION:
            raise VaultCorrupt(f"{what}: cannot decompress: impossible content size {size}", object=what)
        self.size = size
        self.remaining = size
        self._compressed = compressed
        self._reader = zstandard.ZstdDecompressor().stream_reader(compressed)

    def read_all(self) -> bytes:
        """Everything, when nothing was read yet: one buffer, no copy."""
        if self.remaining != self.size:
            return self.read(self.remaining)
        try:
            out = zstandard.ZstdDecompressor().decompress(self._compressed)
        except zstandard.ZstdError as exc:
            raise VaultCorrupt(f"{self.what}: cannot decompress: {exc}", object=self.what) from None
        self.remaining = 0
        return out

    def read(self, n: int) -> bytes:
        buf = bytearray(self._check(n))
        self.readinto(buf)
        return bytes(buf)

    def readinto(self, buf: bytearray | memoryview) -> None:
        """Fill all of ``buf``."""
        view = memoryview(buf).cast("B")
        self._check(view.nbytes)
        done = 0
        try:
            while done < view.nbytes:
                got = self._reader.readinto(view[done:])
                if not got:
                    raise VaultCorrupt(f"{self.what}: truncated (cannot decompress)", object=self.what)
                done += got
        except zstandard.ZstdError as exc:
            raise VaultCorrupt(f"{self.what}: cannot decompress: {exc}", object=self.what) from None
        self.remaining -= done

    def _check(self, n: int) -> int:
        if not 0 <= n <= self.remaining:
            raise VaultCorrupt(f"{self.what}: truncated or malformed (wants {n} bytes, {self.remaining} left)",
                               object=self.what)
        return n
