"""The per-disk manifest ``Backup`` (format.md §8) and ``BackupMetadata`` (§9)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import blake3

from raksha.domain.errors import VaultCorrupt, VaultFormatUnsupported
from raksha.vault.format.constants import BACKUP_MAGIC, ID_SIZE, METADATA_MAGIC
from raksha.vault.format.crypto import Crypto
from raksha.vault.format.naming import BackupId
from raksha.vault.format.sealed import open_object, seal_object

_LEN = struct.Struct("<I")


@dataclass
class Manifest:
    id: BackupId
    virtual_size: int
    chunk_size: int
    chunk_ids: list[bytes]
    source_format: str
    created: str
    parent: str | None = None

    @property
    def chunk_count(self) -> int:
        return -(-self.virtual_size // self.chunk_size)

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.virtual_size - index * self.chunk_size)

    def content_digest(self) -> str:
        h = blake3.blake3(struct.pack("<QQ", self.virtual_size, self.chunk_size))
        for cid in self.chunk_ids:
            h.update(cid)
        return h.hexdigest()


def encode_manifest(m: Manifest, crypto: Crypto) -> bytes:
    if len(m.chunk_ids) != m.chunk_count:
        raise ValueError("chunk id count does not match the virtual size")
    head = json.dumps(
        {
            "version": 1,
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
    payload = _LEN.pack(len(head)) + head + b"".join(m.chunk_ids)
    return seal_object(BACKUP_MAGIC, payload, crypto, aad=m.id.backup_key.encode())


def decode_manifest(data: bytes, backup_id: BackupId, crypto: Crypto) -> Manifest:
    what = backup_id.backup_key
    payload = open_object(data, BACKUP_MAGIC, crypto, what=what, aad=what.encode())
    try:
        (head_len,) = _LEN.unpack_from(payload, 0)
        head = json.loads(payload[4 : 4 + head_len])
        ids_blob = payload[4 + head_len :]
        if head.get("version") != 1:
            raise VaultFormatUnsupported(f"{what}: manifest version {head.get('version')}", object=what)
        m = Manifest(
            id=backup_id,
            virtual_size=int(head["virtual_size"]),
            chunk_size=int(head["chunk_size"]),
            chunk_ids=[],
            source_format=str(head["source_format"]),
            created=str(head["created"]),
            parent=head.get("parent"),
        )
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise VaultCorrupt(f"{what}: malformed manifest head: {exc}", object=what) from None
    if m.chunk_size <= 0 or m.chunk_size & (m.chunk_size - 1) or m.virtual_size < 0:
        raise VaultCorrupt(f"{what}: impossible chunk size or virtual size", object=what)
    if head.get("id") != str(backup_id) or len(ids_blob) != m.chunk_count * ID_SIZE:
        raise VaultCorrupt(f"{what}: manifest does not match its id or size", object=what)
    m.chunk_ids = [ids_blob[i : i + ID_SIZE] for i in range(0, len(ids_blob), ID_SIZE)]
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
