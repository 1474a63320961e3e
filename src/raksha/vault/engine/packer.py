"""Assembles blobs into pack files in the staging directory and stores them with their index."""

from __future__ import annotations

import errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from raksha.domain.errors import AlreadyExists, BackendError, RakshaError, StorageFull
from raksha.vault.directio import WRITE_BUFFERS, SequentialFile
from raksha.vault.format.index import INDEX_ROW_SIZE, Location, index_key, index_rows
from raksha.vault.format.pack import PackEntry, encode_pack_trailer, new_pack_preamble, pack_key
from raksha.vault.malloc import POOL
from raksha.vault.repository import Vault


@dataclass
class _OpenPack:
    file: SequentialFile  # hashes what it writes, in its writer thread (off the packer's lock)
    hasher: blake3.blake3
    buffers: list[mmap.mmap]
    entries: list[PackEntry] = field(default_factory=list)


WRITE_BUFFER = 2 << 20  # WRITE_BUFFERS per open pack, written behind while another fills


MAX_SEALING = 2  # full packs waiting for their fsyncs and index at once; then ``add`` waits
# Each sealed pack is indexed at once (a killed backup's packs stay usable), by an index object of a
# few dozen entries; every load of the index reads each object. So the packer replaces them with
# one object per MERGE_ENTRIES (about 5 MB: 64 GiB of data at 1 MiB chunks) and at the end: a vault of
# a million chunks loaded its index in 4.3-7 s from 31,250 small objects, 1.2 s from ten.
MERGE_ENTRIES = 1 << 16


class Packer:
    """Thread-safe: workers call ``add``; full packs are sealed (fsynced, stored, indexed) in order by a
    background thread, so the workers go on reading and compressing meanwhile. ``flush`` seals the
    last pack and waits for all of them; a sealing error is raised by the next ``add`` or ``flush``."""

    def __init__(self, vault: Vault) -> None:
        self._vault = vault
        self._lock = threading.Lock()  # the open pack; held while a blob is copied in
        self._books = threading.Lock()  # everything else: never held across I/O, so sealing never waits for adds
        self._current: _OpenPack | None = None
        self._staged: list[Path] = []
        self._spare: list[list[mmap.mmap]] = []  # write buffers of sealed packs, for the next ones
        self.packs_written = 0
        self.bytes_written = 0
        self.indexes_written: list[str] = []  # the index objects this packer wrote and did not replace
        self._unmerged: list[str] = []  # small index objects (one per pack) not yet merged
        self._unmerged_rows = bytearray()  # their entries, packed as index rows
        self._sealer: ThreadPoolExecutor | None = None
        self._sealing: list[Future[None]] = []

    def add(self, chunk_id: bytes, blob: bytes | memoryview, raw_length: int) -> None:
        """Append a blob; it is copied before this returns, so ``blob`` may be a reused buffer."""
        full: _OpenPack | None = None
        with self._lock:
            pack = self._current or self._open()
            entry = PackEntry(chunk_id, pack.file.size, len(blob), raw_length)
            self._write(pack, blob)
            pack.entries.append(entry)
            if pack.file.size >= self._vault.config.pack_size:
                full, self._current = pack, None
        if full is not None:
            self._submit(full)

    def flush(self) -> None:
        with self._lock:
            pack, self._current = self._current, None
        self._wait(0)
        if pack is not None:  # the last pack in this thread, as it would wait for it anyway: no hand-off
            self._seal(pack)
        self._stop()
        self._give_back()
        self._merge()

    def _merge(self) -> None:
        """One index object for the small ones written since the last merge, then those go.

        The merged object lists them as superseded and is durable before they are deleted: a reader
        that sees both ignores the small ones, one that finds a small one gone lists again (as after a
        gc), and a crash in between leaves both, which gc cleans up."""
        with self._books:
            small, rows = self._unmerged, self._unmerged_rows
            self._unmerged, self._unmerged_rows = [], bytearray()
        if len(small) < 2:
            return
        try:
            merged = self._vault.write_index(rows, [bytes.fromhex(i) for i in small])
        except RakshaError:
            return  # only slower loads: every pack stays indexed by its own object
        gone = set()
        for index_id in small:
            try:
                self._vault.backend.delete(index_key(index_id))
            except RakshaError:
                pass  # superseded by the merged object, so ignored until gc deletes it
            gone.add(index_id)
        with self._books:
            self.indexes_written = [i for i in self.indexes_written if i not in gone] + [merged]

    def abort(self) -> None:
        """Remove staged files of an unfinished backup; stored packs stay (a rerun reuses them)."""
        with self._lock:
            if self._current is not None:
                self._current.file.close()  # its writer thread ended: nothing uses its buffers
                with self._books:
                    self._spare.append(self._current.buffers)
                self._current = None
        try:
            self._wait(0)
        except BaseException:
            pass  # the error that made us abort is already on its way
        self._stop()
        self._give_back()
        with self._books:
            for p in self._staged:
                p.unlink(missing_ok=True)

    def _submit(self, pack: _OpenPack) -> None:
        with self._books:
            if self._sealer is None:
                self._sealer = ThreadPoolExecutor(1, thread_name_prefix="raksha-pack-sealer")
            self._sealing.append(self._sealer.submit(self._seal, pack))
        self._wait(MAX_SEALING)

    def _wait(self, at_most: int) -> None:
        """Wait until at most ``at_most`` packs are being sealed; raise the first sealing error."""
        while True:
            with self._books:
                for f in [f for f in self._sealing if f.done()]:
                    self._sealing.remove(f)
                    f.result()  # raises what sealing raised
                if len(self._sealing) <= at_most:
                    return
                oldest = self._sealing[0]
            wait([oldest])

    def _stop(self) -> None:
        with self._books:
            sealer, self._sealer = self._sealer, None
        if sealer is not None:
            sealer.shutdown(wait=True)

    def _give_back(self) -> None:
        """The write buffers, once no pack is open or being sealed: to the next packer of the process."""
        with self._books:
            spare, self._spare = self._spare, []
        POOL.give(*(buf for buffers in spare for buf in buffers))

    def _open(self) -> _OpenPack:
        path = self._vault.backend.staging_dir() / f"pack-{os.getpid()}-{os.urandom(8).hex()}.partial"
        try:
            hasher = blake3.blake3()
            with self._books:
                spare = self._spare.pop() if self._spare else None
            buffers = spare or [POOL.take(WRITE_BUFFER) for _ in range(WRITE_BUFFERS)]
            pack = _OpenPack(SequentialFile(path, hasher=hasher, buffers=buffers), hasher, buffers)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"no space left in {path.parent} for a new pack") from exc
            raise BackendError(f"cannot create {path}: {exc}") from exc
        with self._books:
            self._staged.append(path)
        self._current = pack
        self._write(pack, new_pack_preamble())
        return pack

    def _write(self, pack: _OpenPack, data: bytes | memoryview) -> None:
        pack.file.write(data)

    def _seal(self, pack: _OpenPack) -> None:
        try:
            self._write(pack, encode_pack_trailer(pack.entries, self._vault.crypto))
            pack.file.finish()  # every byte is hashed once this returns
        finally:
            pack.file.close()
            with self._books:
                self._spare.append(pack.buffers)
        path, size = pack.file.path, pack.file.size
        pack_id = pack.hasher.hexdigest()
        try:
            self._vault.backend.put_file(pack_key(pack_id), path)
        except AlreadyExists:
            # Packs carry a random nonce, so an equal name means these very bytes were stored (a retried put).
            pass
        pid = bytes.fromhex(pack_id)
        # The index is written only once its pack is durable, so an index never points at nothing.
        rows = index_rows((e.chunk_id, Location(pid, e.offset, e.stored_length, e.raw_length)) for e in pack.entries)
        index_id = self._vault.write_index(rows)
        with self._books:
            self._staged.remove(path)
            self.packs_written += 1
            self.bytes_written += size
            self.indexes_written.append(index_id)
            self._unmerged.append(index_id)
            self._unmerged_rows += rows
            merge = len(self._unmerged_rows) >= MERGE_ENTRIES * INDEX_ROW_SIZE
        if merge:
            self._merge()  # in the sealer thread: packs seal one at a time, so merges do too
