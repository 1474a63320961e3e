"""Sealed metadata objects (format.md §12): magic | version | flags | body."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, cast

import blake3
import zstandard

from raksha.domain.errors import VaultCorrupt, VaultFormatUnsupported
from raksha.vault.format.constants import FLAG_ENCRYPTED, ID_SIZE, NONCE_SIZE, OBJECT_VERSION, TAG_SIZE
from raksha.vault.format.crypto import Crypto

_HEAD = 6
# Metadata objects are small and rare next to chunks: a fresh (de)compressor per
# call is cheap and keeps this thread-safe (zstandard objects are not).
_LEVEL = 3


Buffer = bytes | bytearray | memoryview
# A zstd frame cannot expand more than about 32,000-fold (a 3-byte RLE block header and one byte make up
# to 128 KiB); a frame claiming more is damaged, and is not allowed to make us allocate that much.
MAX_EXPANSION = 1 << 16
STREAM_PIECE = 4 << 20  # a streamed object is read in pieces of this size
_FRAME_HEADER = 18  # a zstd frame header's largest size: what its content size is read from


def seal_object(magic: bytes, payload: Buffer | Sequence[Buffer], crypto: Crypto, aad: bytes = b"") -> bytes:
    """Compress and seal ``payload``: one buffer, or several compressed one after another as if joined."""
    parts = [payload] if isinstance(payload, bytes | bytearray | memoryview) else payload
    views = [memoryview(p).cast("B") for p in parts]
    out: list[bytes] = []
    seal_stream(magic, views, sum(v.nbytes for v in views), crypto, out.append, aad)
    return b"".join(out)


def seal_stream(magic: bytes, parts: Iterable[Buffer], size: int, crypto: Crypto,
                write: Callable[[bytes], object], aad: bytes = b"") -> None:
    """The bytes ``seal_object`` returns for ``parts`` (``size`` bytes in all), handed to ``write`` a piece
    at a time: a large disk's manifest is sealed without ever being held whole."""
    compressor = zstandard.ZstdCompressor(level=_LEVEL).compressobj(size=size)
    if crypto.encrypted:
        write(magic + bytes([OBJECT_VERSION, FLAG_ENCRYPTED]))
        sealer = crypto.sealer(magic + aad)
        write(sealer.head)
        for piece in _compressed(compressor, parts):
            write(sealer.update(piece))
        write(sealer.finish())
        return
    write(magic + bytes([OBJECT_VERSION, 0]))
    digest = blake3.blake3()
    for piece in _compressed(compressor, parts):
        digest.update(piece)
        write(piece)
    write(digest.digest())


def _compressed(compressor: Any, parts: Iterable[Buffer]) -> Iterator[bytes]:
    for part in parts:
        yield compressor.compress(part)
    yield compressor.flush()


def open_object(data: bytes, magic: bytes, crypto: Crypto, *, what: str, aad: bytes = b"") -> bytes:
    """The whole payload of a sealed object."""
    return open_payload(data, magic, crypto, what=what, aad=aad).read_all()


def _check_head(data: bytes, magic: bytes, crypto: Crypto, what: str) -> bool:
    """Check a sealed object's first bytes; whether it is encrypted."""
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
    encrypted = bool(flags & FLAG_ENCRYPTED)
    if encrypted != crypto.encrypted:
        raise VaultCorrupt(f"{what}: encryption flag does not match the vault", object=what)
    return encrypted


def open_payload(data: bytes, magic: bytes, crypto: Crypto, *, what: str, aad: bytes = b"") -> Payload:
    """A sealed object's payload, checked and decrypted, decompressed as it is read."""
    encrypted = _check_head(data, magic, crypto, what)
    body = data[_HEAD:]
    if encrypted:
        compressed = crypto.open(body, magic + aad, what=what)
    else:
        if len(body) < ID_SIZE:
            raise VaultCorrupt(f"{what}: truncated", object=what)
        compressed, digest = body[:-ID_SIZE], body[-ID_SIZE:]
        if blake3.blake3(compressed).digest() != digest:
            raise VaultCorrupt(f"{what}: checksum mismatch (damaged)", object=what)
    return Payload(compressed, what)


def open_stream(read_range: Callable[[int, int], bytes], size: int, first: bytes, magic: bytes, crypto: Crypto,
                *, what: str, aad: bytes = b"") -> Payload:
    """As ``open_payload`` for an object of ``size`` bytes read a piece at a time through ``read_range``
    (``first``: its first bytes, read already). Whether it is authentic is known only once every piece
    was read: the caller must call ``Payload.finish()`` before trusting anything it read."""
    encrypted = _check_head(first, magic, crypto, what)
    return Payload(_Body(read_range, size, first, magic + aad, crypto, encrypted, what), what)


class _Body:
    """A sealed object's compressed payload read in pieces of STREAM_PIECE, decrypted or checksummed on
    the way (a ``read`` for zstd); its tag or checksum, at the end, is compared when the last piece is."""

    def __init__(self, read_range: Callable[[int, int], bytes], size: int, first: bytes, aad: bytes,
                 crypto: Crypto, encrypted: bool, what: str) -> None:
        start = _HEAD + (NONCE_SIZE if encrypted else 0)
        self._trailer = TAG_SIZE if encrypted else ID_SIZE
        if size < start + self._trailer:
            raise VaultCorrupt(f"{what}: truncated", object=what)
        if len(first) < start:  # the nonce goes beyond what was read
            first += read_range(len(first), start - len(first))
            if len(first) < start:
                raise VaultCorrupt(f"{what}: truncated", object=what)
        self.what = what
        self._read_range = read_range
        self._size, self._end = size, size - self._trailer
        self.length = self._end - start  # compressed bytes
        self._opener = crypto.opener(first[_HEAD:start], aad, what=what) if encrypted else None
        self._digest = None if encrypted else blake3.blake3()
        self._first = first[start : min(len(first), self._end)]  # body bytes read already
        self._pos = start + len(self._first)
        self._pending = b""
        self._checked = False

    def _get(self, offset: int, n: int) -> bytes:
        data = self._read_range(offset, n)
        if len(data) != n:
            raise VaultCorrupt(f"{self.what}: truncated (shorter than when it was listed)", object=self.what)
        return data

    def _next(self) -> bytes:
        """The next piece of the compressed payload; b"" at its end, once the tag or checksum matched."""
        if self._first:
            raw, self._first = self._first, b""
        elif self._pos < self._end:
            raw = self._get(self._pos, min(STREAM_PIECE, self._end - self._pos))
            self._pos += len(raw)
        else:
            if not self._checked:
                trailer = self._get(self._end, self._trailer)
                if self._opener is not None:
                    self._opener.finish(trailer)  # GCM: nothing held back
                elif self._digest is not None and self._digest.digest() != trailer:
                    raise VaultCorrupt(f"{self.what}: checksum mismatch (damaged)", object=self.what)
                self._checked = True
            return b""
        if self._opener is not None:
            return self._opener.update(raw)
        assert self._digest is not None
        self._digest.update(raw)
        return raw

    def peek(self, n: int = 1) -> bytes:
        """At least ``n`` of the next bytes (fewer only at the end), without reading them."""
        while len(self._pending) < n:
            more = self._next()
            if not more:
                break
            self._pending += more
        return self._pending

    def read(self, n: int = -1) -> bytes:
        pending = self.peek()
        if n < 0 or n >= len(pending):
            self._pending = b""
            return pending
        self._pending = pending[n:]
        return pending[:n]

    def finish(self) -> None:
        """Read to the end, so the tag or checksum is compared (VAULT_CORRUPT if it does not match)."""
        self._pending = b""
        while self._next():
            pass


class Payload:
    """A decompressing reader that gives exactly what is asked for or raises VAULT_CORRUPT."""

    def __init__(self, compressed: bytes | _Body, what: str) -> None:
        self.what = what
        self._body = compressed if isinstance(compressed, _Body) else None
        head, length = (compressed.peek(_FRAME_HEADER), compressed.length) if isinstance(compressed, _Body) else (
            compressed, len(compressed))
        try:
            size = zstandard.frame_content_size(head)
        except zstandard.ZstdError as exc:
            raise VaultCorrupt(f"{what}: cannot decompress: {exc}", object=what) from None
        if not 0 <= size <= length * MAX_EXPANSION:
            raise VaultCorrupt(f"{what}: cannot decompress: impossible content size {size}", object=what)
        self.size = size
        self.remaining = size
        self._compressed = compressed
        # A _Body is file-like enough for zstd: it only calls ``read``.
        source = compressed if isinstance(compressed, bytes) else cast("IO[bytes]", compressed)
        self._reader = zstandard.ZstdDecompressor().stream_reader(source)

    def finish(self) -> None:
        """Raise VAULT_CORRUPT unless everything read is authentic: a streamed object's tag or checksum
        is at its end (an object read whole was checked before anything was read)."""
        if self._body is not None:
            self._body.finish()

    def read_all(self) -> bytes:
        """Everything, when nothing was read yet: one buffer, no copy."""
        if self.remaining != self.size or not isinstance(self._compressed, bytes):
            out = self.read(self.remaining)
            self.finish()
            return out
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
