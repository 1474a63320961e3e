"""Whether a disk image holds what a backup holds, chunk by chunk: a restore proven by reading it back.

Each chunk of the image is read and hashed with the vault's chunk id function (keyed when the vault is
encrypted) and compared with the manifest's id. A chunk the manifest lists as zero must read as zeros. A
chunk with delta layers has no id of its whole content, so it is assembled from the vault (every blob
checked against its id) and compared byte for byte. Holes of the image (a sparse file's, a qcow2 image's
unallocated clusters) read as zeros without being read.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from raksha.domain.errors import ChunkMissing
from raksha.vault.directio import AlignedBuffers
from raksha.vault.engine.blobio import ChunkReader
from raksha.vault.engine.changes import chunks_touching
from raksha.vault.engine.progress import Progress, ProgressCallback
from raksha.vault.engine.workers import run_parallel
from raksha.vault.format.chunk_table import IdSet
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.naming import BackupId
from raksha.vault.locks import LockKind
from raksha.vault.repository import Vault
from raksha.vault.sources.base import DiskSource

MAX_LISTED = 100  # differing chunks named in a report; the count is always whole


@dataclass
class CompareReport:
    id: BackupId
    image: str
    virtual_size: int  # the backup's
    image_size: int
    chunks: int
    differing: int = 0
    first_differing: list[int] = field(default_factory=list)  # chunk indexes, up to MAX_LISTED
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def identical(self) -> bool:
        return self.image_size == self.virtual_size and self.differing == 0

    def to_dict(self) -> dict[str, Any]:
        return {"id": str(self.id), "image": self.image, "identical": self.identical,
                "virtual_size": self.virtual_size, "image_size": self.image_size, "chunks": self.chunks,
                "chunks_differing": self.differing, "first_differing": self.first_differing,
                "bytes_read": self.bytes_read, "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        if self.image_size != self.virtual_size:
            return (f"{self.image} differs from backup {self.id}: it is {self.image_size} bytes, the backup's disk "
                    f"{self.virtual_size}")
        if self.identical:
            return f"{self.image} holds backup {self.id}: all {self.chunks} chunks read back and identical"
        return (f"{self.image} differs from backup {self.id} in {self.differing} of {self.chunks} chunks "
                f"(first: {', '.join(map(str, self.first_differing[:10]))})")


def compare_image(vault: Vault, backup_id: BackupId, source: DiskSource, *, threads: int | None = None,
                  progress: ProgressCallback | None = None) -> CompareReport:
    """Read ``source`` back and compare it with backup ``backup_id``, chunk by chunk."""
    with vault.locks.acquire(LockKind.SHARED, f"compare {backup_id}"):
        start = time.monotonic()
        m = vault.read_manifest(backup_id)
        report = CompareReport(backup_id, source.path, m.virtual_size, source.virtual_size, m.chunk_count)
        if source.virtual_size != m.virtual_size:
            return report
        bases = (m.chunk_ids[i] for i in m.deltas.indexes())  # a layered chunk's base and its layers
        needed = IdSet(cid for cid in itertools.chain(bases, m.deltas.blob_ids()) if cid != ZERO_ID)
        index = vault.load_index(tolerant=True, only=needed) if needed else None
        missing = [cid for cid in needed if index is None or cid not in index]
        if missing:
            raise ChunkMissing(f"backup {backup_id}: {len(missing)} layer blob(s) missing from the vault; run "
                               "'raksha vault verify'", backup=str(backup_id), chunks=[c.hex() for c in missing[:10]])
        reader = ChunkReader(vault, index.locations if index is not None else {}, m.chunk_size)
        expected = AlignedBuffers(m.chunk_size)
        zero = bytes(m.chunk_size)
        with_data = chunks_touching(source.data_extents(), m.chunk_size, m.virtual_size)
        lock = threading.Lock()
        meter = Progress("compare", m.virtual_size, progress)

        def one(i: int) -> None:
            offset, length = i * m.chunk_size, m.chunk_length(i)
            cid = m.chunk_ids[i]
            if i in with_data:
                data = source.pread(offset, length)
                read = length
            else:
                data, read = zero[:length], 0
            if i in m.deltas:
                want = memoryview(expected.get())[:length]
                reader.chunk_into(m, i, want)
                same = data == want
            elif cid == ZERO_ID:
                same = data == zero[:length]
            else:
                same = read > 0 and vault.crypto.chunk_id(data) == cid  # a hole is not this chunk
            with lock:
                report.bytes_read += read
                if not same:
                    report.differing += 1
                    if len(report.first_differing) < MAX_LISTED:
                        report.first_differing.append(i)
            meter.add(length)

        run_parallel(range(m.chunk_count), one, threads or 2 * (os.cpu_count() or 1))
        report.first_differing.sort()
        meter.finish()
        report.seconds = time.monotonic() - start
        return report

