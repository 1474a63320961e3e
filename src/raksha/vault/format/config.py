"""The vault's ``config`` object (format.md §3)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from raksha.domain.errors import InvalidInput, VaultCorrupt, VaultFormatUnsupported
from raksha.vault.format.constants import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_COMPRESSION_LEVEL,
    DEFAULT_PACK_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
)


@dataclass(frozen=True)
class VaultConfig:
    vault_id: str
    created: str
    chunk_size: int = DEFAULT_CHUNK_SIZE
    pack_size: int = DEFAULT_PACK_SIZE
    compression_level: int = DEFAULT_COMPRESSION_LEVEL
    encrypted: bool = False

    @classmethod
    def new(
        cls,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        pack_size: int = DEFAULT_PACK_SIZE,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        encrypted: bool = False,
    ) -> VaultConfig:
        if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise InvalidInput(
                f"chunk size {chunk_size} must be a power of two from 64 KiB to 64 MiB",
                code="INVALID_CHUNK_SIZE",
            )
        if not 1 <= compression_level <= 22:
            raise InvalidInput(f"zstd level {compression_level} must be 1..22", code="INVALID_COMPRESSION")
        if not chunk_size <= pack_size <= 1 << 30:
            raise InvalidInput(f"pack size {pack_size} must be from the chunk size to 1 GiB", code="INVALID_PACK_SIZE")
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(uuid.uuid4().hex, created, chunk_size, pack_size, compression_level, encrypted)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "vault_id": self.vault_id,
            "created": self.created,
            "chunk_size": self.chunk_size,
            "pack_size": self.pack_size,
            "compression": {"algorithm": "zstd", "level": self.compression_level},
            "encryption": {"algorithm": "aes-256-gcm", "chunk_id": "blake3-keyed"} if self.encrypted else None,
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> VaultConfig:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
                raise VaultCorrupt("config: not a Raksha vault", object="config")
            if doc.get("version") != FORMAT_VERSION:
                raise VaultFormatUnsupported(
                    f"vault format version {doc.get('version')} is not supported "
                    f"(this Raksha reads version {FORMAT_VERSION})",
                    object="config",
                )
            comp = doc["compression"]
            if comp.get("algorithm") != "zstd":
                raise VaultFormatUnsupported(f"compression {comp.get('algorithm')!r} is not supported")
            enc = doc.get("encryption")
            if enc is not None and enc.get("algorithm") != "aes-256-gcm":
                raise VaultFormatUnsupported(f"encryption {enc.get('algorithm')!r} is not supported")
            config = cls(
                vault_id=str(doc["vault_id"]),
                created=str(doc["created"]),
                chunk_size=int(doc["chunk_size"]),
                pack_size=int(doc["pack_size"]),
                compression_level=int(comp["level"]),
                encrypted=enc is not None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VaultCorrupt(f"config: malformed: {exc}", object="config") from None
        # Everything chunking depends on must be what a writer could have written (§3).
        size = config.chunk_size
        if size & (size - 1) or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE or config.pack_size < size:
            raise VaultCorrupt(
                f"config: chunk size {size} / pack size {config.pack_size} are not valid", object="config"
            )
        return config
