"""The per-disk manifest ``Backup`` (format.md §8) and ``BackupMetadata`` (§9)."""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import blake3

from raksha.domain.errors import VaultCorrupt, VaultFormatUnsupported
from raksha.vault.format.chunk_ids import ChunkIds
from raksha.vault.format.chunk_table import IdSet
from raksha.vault.format.constants import BACKUP_MAGIC, ID_SIZE, METADATA_MAGIC, ZERO_ID
from raksha.vault.format.crypto import Crypto
from raksha.vault.format.deltas import Deltas
from raksha.vault.format.naming import BackupId
from raksha.vault.format.sealed import Payload, open_object, open_payload, open_stream, seal_object, seal_stream

_LEN = struct.Struct("<I")


@dataclass
class Manifest:
    id: BackupId
    virtual_size: int
    chunk_size: int
    chunk_ids: ChunkIds  # for a chunk with deltas: its base (a list of ids is converted)
    source_format: str
    created: str
    parent: str | None = None
    deltas: Deltas = field(default_factory=Deltas)  # chunk index -> layers, in order (a dict is converted)

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_ids, ChunkIds):
            self.chunk_ids = ChunkIds(self.chunk_ids)
        if not isinstance(self.deltas, Deltas):
            self.deltas = Deltas(self.deltas)

    @property
    def chunk_count(self) -> int:
        return -(-self.virtual_size // self.chunk_size)

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.virtual_size - index * self.chunk_size)

    @property
    def version(self) -> int:
        return 2 if self.deltas else 1

    def is_zero(self, index: int) -> bool:
        """Chunk ``index`` is all zero: zero id and no layers."""
        return self.chunk_ids[index] == ZERO_ID and index not in self.deltas

    def blob_ids(self, start: int = 0, end: int | None = None) -> IdSet:
        """Every stored blob the content of chunks ``start`` to ``end`` (all) needs: chunks, bases and
        layers (never the zero id)."""
        return IdSet(self.iter_blob_ids(start, end))

    def iter_blob_ids(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """``blob_ids`` one at a time, repeats and all: to add to a set without a second one."""
        yield from (cid for cid in self.chunk_ids.ids(start, end) if cid != ZERO_ID)
        yield from self.deltas.blob_ids(start, end)

    def data_bytes(self) -> int:
        """Bytes of the chunks that are not all zero: what a restore writes."""
        return sum(self.chunk_length(i) for i, cid in enumerate(self.chunk_ids)
                   if cid != ZERO_ID or i in self.deltas)

    def content_digest(self) -> str:
        h = blake3.blake3(struct.pack("<QQ", self.virtual_size, self.chunk_size))
        for piece in self.chunk_ids.pieces():  # the ids one after another, as format.md §8 says
            h.update(piece)
        if self.deltas:
            for piece in self.deltas.pieces():
                h.update(piece)
        return h.hexdigest()


def encode_manifest(m: Manifest, crypto: Crypto) -> bytes:
    out: list[bytes] = []
    write_manifest(m, crypto, out.append)
    return b"".join(out)


def write_manifest(m: Manifest, crypto: Crypto, write: Callable[[bytes], object]) -> None:
    """The sealed manifest handed to ``write`` a piece at a time: a large disk's ids are never joined."""
    if len(m.chunk_ids) != m.chunk_count:
        raise ValueError("chunk id count does not match the virtual size")
    head = json.dumps(
        {
            "version": m.version,
            "id": str(m.id),
            "virtual_size": m.virtual_size,
            "chunk_size": m.chunk_size,
            "chunk_count": m.chunk_count,
            "source_format": m.source_format,
            "parent": m.parent,
            "created": m.created,
            "content_digest": m.content_digest(),
        },
        sort_keys=True,
    ).encode()
    deltas = m.deltas.pieces() if m.deltas else ()
    parts = itertools.chain((_LEN.pack(len(head)), head), m.chunk_ids.pieces(), deltas)
    size = _LEN.size + len(head) + m.chunk_count * ID_SIZE + (m.deltas.encoded_size if m.deltas else 0)
    seal_stream(BACKUP_MAGIC, parts, size, crypto, write, aad=m.id.backup_key.encode())


def decode_manifest(data: bytes, backup_id: BackupId, crypto: Crypto) -> Manifest:
    what = backup_id.backup_key
    return _decode(open_payload(data, BACKUP_MAGIC, crypto, what=what, aad=what.encode()), backup_id)


def read_manifest_stream(read_range: Callable[[int, int], bytes], size: int, first: bytes, backup_id: BackupId,
                         crypto: Crypto) -> Manifest:
    """The manifest of ``size`` bytes read a piece at a time (``first``: its first bytes): a large disk's
    is never held whole, and its ids go straight to their file (``ChunkIds``)."""
    what = backup_id.backup_key
    return _decode(open_stream(read_range, size, first, BACKUP_MAGIC, crypto, what=what, aad=what.encode()),
                   backup_id)


def _decode(payload: Payload, backup_id: BackupId) -> Manifest:
    what = backup_id.backup_key
    # Read in parts, the ids straight into their own buffer (or file): decompressing the whole payload
    # first, then copying them out, held a 1 TiB disk's 32 MB of ids twice more.
    try:
        (head_len,) = _LEN.unpack(payload.read(_LEN.size))
        head = json.loads(payload.read(head_len))
        version = head.get("version")
        if version not in (1, 2):
            raise VaultFormatUnsupported(f"{what}: manifest version {head.get('version')}", object=what)
        m = Manifest(
            id=backup_id,
            virtual_size=int(head["virtual_size"]),
            chunk_size=int(head["chunk_size"]),
            chunk_ids=ChunkIds(),
            source_format=str(head["source_format"]),
            created=str(head["created"]),
            parent=head.get("parent"),
        )
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise VaultCorrupt(f"{what}: malformed manifest head: {exc}", object=what) from None
    if m.chunk_size <= 0 or m.chunk_size & (m.chunk_size - 1) or m.virtual_size < 0:
        raise VaultCorrupt(f"{what}: impossible chunk size or virtual size", object=what)
    ids_end = m.chunk_count * ID_SIZE
    rest = payload.remaining
    if head.get("id") != str(backup_id) or rest < ids_end or (version == 1 and rest != ids_end):
        raise VaultCorrupt(f"{what}: manifest does not match its id or size", object=what)
    m.chunk_ids = ChunkIds.zeros(m.chunk_count)
    m.chunk_ids.fill(payload.readinto)  # zero ids not written: a sparse disk's take no memory
    if version == 2:
        # A piece at a time, into a file for a large disk's (Deltas): never the whole section in memory.
        m.deltas = Deltas.read(payload.read, payload.remaining, m.chunk_count, m.chunk_length, what)
        if not m.deltas:
            raise VaultCorrupt(f"{what}: version 2 manifest without deltas", object=what)
    payload.finish()  # a streamed manifest is authentic only now
    if head.get("content_digest") != m.content_digest():
        raise VaultCorrupt(f"{what}: content digest mismatch", object=what)
    return m


def encode_metadata(backup_id: BackupId, meta: dict[str, Any], crypto: Crypto) -> bytes:
    payload = json.dumps({"version": 1, "id": str(backup_id), **meta}, sort_keys=True).encode()
    return seal_object(METADATA_MAGIC, payload, crypto, aad=backup_id.metadata_key.encode())


def decode_metadata(data: bytes, backup_id: BackupId, crypto: Crypto) -> dict[str, Any]:
    what = backup_id.metadata_key
    payload = open_object(data, METADATA_MAGIC, crypto, what=what, aad=what.encode())
    try:
        meta = json.loads(payload)
    except ValueError as exc:
        raise VaultCorrupt(f"{what}: malformed metadata: {exc}", object=what) from None
    if not isinstance(meta, dict):
        raise VaultCorrupt(f"{what}: metadata is not an object", object=what)
    return meta
