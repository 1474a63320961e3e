"""Assembles blobs into pack files in the staging directory and stores them with their index."""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from raksha.domain.errors import AlreadyExists, BackendError, StorageFull
from raksha.vault.directio import SequentialFile
from raksha.vault.format.index import Location
from raksha.vault.format.pack import PackEntry, encode_pack_trailer, new_pack_preamble, pack_key
from raksha.vault.repository import Vault


@dataclass
class _OpenPack:
    file: SequentialFile
    hasher: blake3.blake3
    entries: list[PackEntry] = field(default_factory=list)


class Packer:
    """Thread-safe: workers call ``add``; a full pack is sealed by the worker that filled it."""

    def __init__(self, vault: Vault) -> None:
        self._vault = vault
        self._lock = threading.Lock()
        self._current: _OpenPack | None = None
        self._staged: list[Path] = []
        self.packs_written = 0
        self.bytes_written = 0
        self.indexes_written: list[str] = []  # one per sealed pack, in order

    def add(self, chunk_id: bytes, blob: bytes, raw_length: int) -> None:
        full: _OpenPack | None = None
        with self._lock:
            pack = self._current or self._open()
            entry = PackEntry(chunk_id, pack.file.size, len(blob), raw_length)
            self._write(pack, blob)
            pack.entries.append(entry)
            if pack.file.size >= self._vault.config.pack_size:
                full, self._current = pack, None
        if full is not None:
            self._seal(full)

    def flush(self) -> None:
        with self._lock:
            pack, self._current = self._current, None
        if pack is not None:
            self._seal(pack)

    def abort(self) -> None:
        """Remove staged files of an unfinished backup; stored packs stay (a rerun reuses them)."""
        with self._lock:
            if self._current is not None:
                self._current.file.close()
                self._current = None
            for p in self._staged:
                p.unlink(missing_ok=True)

    def _open(self) -> _OpenPack:
        path = self._vault.backend.staging_dir() / f"pack-{os.getpid()}-{os.urandom(8).hex()}.partial"
        try:
            pack = _OpenPack(SequentialFile(path), blake3.blake3())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"no space left in {path.parent} for a new pack") from exc
            raise BackendError(f"cannot create {path}: {exc}") from exc
        self._staged.append(path)
        self._current = pack
        self._write(pack, new_pack_preamble())
        return pack

    def _write(self, pack: _OpenPack, data: bytes) -> None:
        pack.file.write(data)
        pack.hasher.update(data)

    def _seal(self, pack: _OpenPack) -> None:
        try:
            self._write(pack, encode_pack_trailer(pack.entries, self._vault.crypto))
            pack.file.finish()
        finally:
            pack.file.close()
        path, size = pack.file.path, pack.file.size
        pack_id = pack.hasher.hexdigest()
        try:
            self._vault.backend.put_file(pack_key(pack_id), path)
        except AlreadyExists:
            # Packs carry a random nonce, so an equal name means these very bytes were stored (a retried put).
            pass
        pid = bytes.fromhex(pack_id)
        # The index is written only once its pack is durable, so an index never points at nothing.
        index_id = self._vault.write_index(
            {e.chunk_id: Location(pid, e.offset, e.stored_length, e.raw_length) for e in pack.entries}
        )
        with self._lock:
            self._staged.remove(path)
            self.packs_written += 1
            self.bytes_written += size
            self.indexes_written.append(index_id)
