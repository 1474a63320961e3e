"""Pack files (format.md §6): blobs followed by a sealed header and its length."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from raksha.domain.errors import VaultCorrupt, VaultFormatUnsupported
from raksha.vault.format.constants import ID_SIZE, PACK_HEADER_MAGIC, PACK_MAGIC
from raksha.vault.format.crypto import Crypto
from raksha.vault.format.sealed import open_object, seal_object

PACK_NONCE_SIZE = 16
PACK_PREAMBLE_SIZE = 8 + PACK_NONCE_SIZE
_ENTRY = struct.Struct("<32sIII")
_COUNT = struct.Struct("<I")


@dataclass(frozen=True)
class PackEntry:
    chunk_id: bytes
    offset: int
    stored_length: int
    raw_length: int


def new_pack_preamble() -> bytes:
    """Magic, version, and a random nonce: no two packs are ever byte-identical, so no two share a name."""
    return PACK_MAGIC + bytes([1, 0, 0, 0]) + os.urandom(PACK_NONCE_SIZE)


def pack_key(pack_id: str) -> str:
    return f"data/{pack_id[:2]}/{pack_id}"


def encode_pack_trailer(entries: list[PackEntry], crypto: Crypto) -> bytes:
    """The sealed header plus its u32 length; appended after the last blob."""
    payload = _COUNT.pack(len(entries)) + b"".join(
        _ENTRY.pack(e.chunk_id, e.offset, e.stored_length, e.raw_length) for e in entries
    )
    header = seal_object(PACK_HEADER_MAGIC, payload, crypto)
    return header + _COUNT.pack(len(header))


def check_preamble(pack_start: bytes | bytearray | memoryview, size: int, *, what: str) -> None:
    """A pack of ``size`` bytes must be long enough and start with our magic and a version we read."""
    if size < PACK_PREAMBLE_SIZE + 4 or len(pack_start) < 5:
        raise VaultCorrupt(f"{what}: truncated pack", object=what)
    if pack_start[:4] != PACK_MAGIC:
        raise VaultCorrupt(f"{what}: not a pack (bad magic)", object=what)
    if pack_start[4] != 1:
        raise VaultFormatUnsupported(f"{what}: pack version {pack_start[4]} is not supported", object=what)


def decode_pack_header(pack: bytes, crypto: Crypto, *, what: str) -> list[PackEntry]:
    """Parse a whole pack's header, checking that every entry lies inside the blob area."""
    check_preamble(pack, len(pack), what=what)
    (header_len,) = _COUNT.unpack_from(pack, len(pack) - 4)
    blob_end = len(pack) - 4 - header_len
    if blob_end < PACK_PREAMBLE_SIZE:
        raise VaultCorrupt(f"{what}: header length {header_len} exceeds the pack", object=what)
    return decode_header_bytes(pack[blob_end : len(pack) - 4], blob_end, crypto, what=what)


def decode_header_bytes(header: bytes, blob_end: int, crypto: Crypto, *, what: str) -> list[PackEntry]:
    """Parse a header fetched on its own (a ranged read of the pack's tail)."""
    payload = open_object(header, PACK_HEADER_MAGIC, crypto, what=what + " header")
    return _parse_entries(payload, blob_end, what)


def _parse_entries(payload: bytes, blob_end: int, what: str) -> list[PackEntry]:
    if len(payload) < 4:
        raise VaultCorrupt(f"{what}: empty pack header", object=what)
    (count,) = _COUNT.unpack_from(payload, 0)
    if len(payload) != 4 + count * _ENTRY.size:
        raise VaultCorrupt(f"{what}: pack header size does not match its count", object=what)
    entries = []
    for i in range(count):
        chunk_id, offset, stored, raw = _ENTRY.unpack_from(payload, 4 + i * _ENTRY.size)
        if offset < PACK_PREAMBLE_SIZE or offset + stored > blob_end:
            raise VaultCorrupt(f"{what}: entry {i} points outside the pack", object=what)
        entries.append(PackEntry(chunk_id, offset, stored, raw))
    return entries


assert _ENTRY.size == ID_SIZE + 12
