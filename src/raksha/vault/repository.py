"""A vault opened for use: config, keys, catalogue of backups and the chunk index.

This is the one place that knows which object lives under which key; the
engine and the operations go through it.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import struct
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

from raksha.domain.errors import (
    AlreadyExists,
    BackendError,
    InvalidInput,
    NotFound,
    StorageFull,
    VaultCorrupt,
    VaultFormatUnsupported,
    VaultKeyError,
)
from raksha.vault.backends.base import Backend, ObjectInfo
from raksha.vault.format import sealed
from raksha.vault.format.chunk_table import ChunkLocator, ChunkTable, IdSet
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.constants import ID_SIZE
from raksha.vault.format.crypto import Crypto, EncryptedCrypto, MasterKey
from raksha.vault.format.index import IndexFile, Location, decode_index, encode_index, index_key
from raksha.vault.format.keys import (
    KEYS_PREFIX,
    KdfParams,
    Secret,
    key_file_id,
    unwrap_master_key,
    wrap_master_key,
)
from raksha.vault.format.manifest import (
    Manifest,
    decode_manifest,
    decode_metadata,
    encode_manifest,
    encode_metadata,
    read_manifest_stream,
    write_manifest,
)
from raksha.vault.format.naming import PREFIX, BackupId
from raksha.vault.format.pack import PACK_PREAMBLE_SIZE, PackEntry, decode_header_bytes, pack_key
from raksha.vault.format.sorted_ids import DiskIdSet
from raksha.vault.locks import LockManager
from raksha.vault.malloc import fix_mmap_threshold

T = TypeVar("T")
CONFIG_KEY = "config"
INDEX_PREFIX = "index/"
# Up to this many index objects are read one after another: starting the reader threads costs more
# than they save on a local disk (26 objects: 2.4-7 ms inline against 7-9 ms with 8 threads, warm/cold).
INDEX_READ_INLINE = 64
# Decoded index objects held while the index loads (each is read again when this is spent): a vault of
# a million chunks has 76 MB of them, which would double the table's memory for the load. Small, as
# held objects freed after the table has grown leave holes in the heap that stay in the RSS.
INDEX_HOLD_BYTES = 4 << 20
INDEX_BATCH_BYTES = 16 << 20  # index objects read in parallel at once, at most (a merged one is ~5 MB)
MANIFEST_WHOLE = 4 << 20  # manifests larger than this (a 128 GiB dense disk's) are read in pieces
SMALL_FILTER = 1 << 16  # ids a load filters on through a plain set (100 bytes each) rather than an IdSet
# A vault holding more chunks than this gives a backup its stored ids in a temporary file (DiskIdSet,
# ~0.1 byte an id in memory) instead of an IdSet (~45 bytes an id: 24 MB here).
IDS_IN_MEMORY = 1 << 19
DATA_PREFIX = "data/"
LOCKS_PREFIX = "locks/"
CONDEMNED_SUFFIX = ".condemned"


def retry_index_read(attempt: Callable[[], T]) -> T:
    """``attempt()``, again while it meets NotFound: an index object went under a concurrent gc, or a
    backup merging its index, which wrote its replacement first. VAULT_CORRUPT after five tries."""
    for _attempt in range(5):
        try:
            return attempt()
        except NotFound:
            continue
    raise VaultCorrupt("the index keeps changing while being read; is a gc looping?")


def new_id_set(expected: int, what: str) -> IdSet | DiskIdSet:
    """An empty set for about ``expected`` chunk ids: in memory, or past IDS_IN_MEMORY in a temporary
    file (a ``DiskIdSet``: ``finish`` it once every id is in, ``close`` it when done)."""
    if expected > IDS_IN_MEMORY:
        return DiskIdSet(expected, what)
    ids = IdSet()
    ids.reserve(expected)
    return ids


@dataclass
class IndexScan:
    """What ``Vault.scan_index`` learnt in its first pass; ``live()`` is the second."""

    read: Callable[[str], IndexFile | str]
    counts: dict[str, int] = field(default_factory=dict)  # every object read: index id -> entries
    superseded: set[str] = field(default_factory=set)
    held: dict[str, IndexFile] = field(default_factory=dict)  # objects kept from the first pass
    damaged: dict[str, str] | None = None

    @property
    def live_ids(self) -> list[str]:
        return [i for i in self.counts if i not in self.superseded]

    @property
    def live_entries(self) -> int:
        return sum(self.counts[i] for i in self.live_ids)

    def live(self) -> Iterator[tuple[str, IndexFile]]:
        """(index id, object) for every object no other supersedes, read again unless held."""
        for index_id in self.live_ids:
            key = index_key(index_id)
            kept = self.held.pop(key, None)
            f = self.read(key) if kept is None else kept
            if isinstance(f, str):
                assert self.damaged is not None
                self.damaged[key] = f
                continue
            yield index_id, f


@dataclass
class ChunkIndex:
    """Every stored chunk's location, merged from the index objects read."""

    locations: ChunkTable = field(default_factory=ChunkTable)
    ids: IdSet | DiskIdSet | None = None  # every stored chunk, when asked for with locations of only some
    index_ids: set[str] = field(default_factory=set)  # the index objects this was built from
    damaged: dict[str, str] = field(default_factory=dict)  # unreadable index objects left out: key -> error

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self.locations

    def get(self, chunk_id: bytes) -> Location | None:
        return self.locations.get(chunk_id)

    def close(self) -> None:
        """Free the temporary file of a large vault's ids (dropping this does too, later)."""
        if isinstance(self.ids, DiskIdSet):
            self.ids.close()


def _read_key_files(backend: Backend) -> Iterator[bytes]:
    for info in backend.list(KEYS_PREFIX):
        try:
            yield backend.get(info.key)
        except NotFound:
            continue  # removed meanwhile


class Vault:
    def __init__(self, backend: Backend, config: VaultConfig, crypto: Crypto, master: MasterKey | None) -> None:
        fix_mmap_threshold()  # once per process: large transient buffers go back to the system when freed
        self.backend = backend
        self.config = config
        self.crypto = crypto
        self._master = master
        self.locks = LockManager(backend)

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        backend: Backend,
        config: VaultConfig,
        secret: Secret | None = None,
        kdf: KdfParams | None = None,
    ) -> Vault:
        if config.encrypted and secret is None:
            raise InvalidInput("an encrypted vault needs a passphrase or key file", code="VAULT_KEY_REQUIRED")
        if any(True for _ in backend.list(CONFIG_KEY)):
            raise AlreadyExists(f"{backend.url} already holds a vault", code="VAULT_EXISTS")
        master = MasterKey.generate() if config.encrypted else None
        if master is not None and secret is not None:
            key_doc = wrap_master_key(master, secret, config.vault_id, kdf)
            backend.put(KEYS_PREFIX + key_file_id(key_doc), key_doc)
        # config last: a directory without it is not a vault, so a failed init can simply be redone.
        try:
            backend.put(CONFIG_KEY, config.to_json())
        except AlreadyExists:
            raise AlreadyExists(f"{backend.url} already holds a vault", code="VAULT_EXISTS") from None
        crypto = EncryptedCrypto(master) if master is not None else Crypto()
        return cls(backend, config, crypto, master)

    @classmethod
    def open(cls, backend: Backend, secret: Secret | None = None, *,
             key_files: Sequence[bytes] | None = None) -> Vault:
        """``key_files``: the vault's key files as the caller just read them (VaultOpening read them to
        start deriving): not read again, a round trip each on an object store."""
        try:
            config = VaultConfig.from_json(backend.get(CONFIG_KEY))
        except NotFound:
            raise NotFound(f"no vault at {backend.url} (no config object)", code="VAULT_NOT_FOUND") from None
        if not config.encrypted:
            return cls(backend, config, Crypto(), None)
        if secret is None:
            raise VaultKeyError(
                f"the vault at {backend.url} is encrypted: give a passphrase or key file",
                code="VAULT_KEY_REQUIRED",
            )
        for data in key_files if key_files is not None else _read_key_files(backend):
            master = unwrap_master_key(data, secret, config.vault_id)
            if master is not None:
                return cls(backend, config, EncryptedCrypto(master), master)
        raise VaultKeyError("wrong passphrase or key file: no key of this vault opens with it")

    def close(self) -> None:
        self.backend.close()

    # -- keys ------------------------------------------------------------------------------------

    def list_keys(self) -> list[dict[str, Any]]:
        out = []
        for info in self.backend.list(KEYS_PREFIX):
            doc = json.loads(self.backend.get(info.key))
            out.append({"id": doc["id"], "created": doc["created"], "hostname": doc.get("hostname"),
                        "kdf": doc["kdf"]["algorithm"]})
        return sorted(out, key=lambda d: str(d["created"]))

    def add_key(self, secret: Secret, kdf: KdfParams | None = None) -> str:
        if self._master is None:
            raise InvalidInput("this vault is not encrypted; it has no keys", code="VAULT_NOT_ENCRYPTED")
        doc = wrap_master_key(self._master, secret, self.config.vault_id, kdf)
        key_id = key_file_id(doc)
        self.backend.put(KEYS_PREFIX + key_id, doc)
        return key_id

    def keys_opened_by(self, secret: Secret) -> set[str]:
        out = set()
        for info in self.backend.list(KEYS_PREFIX):
            data = self.backend.get(info.key)
            if unwrap_master_key(data, secret, self.config.vault_id) is not None:
                out.add(key_file_id(data))
        return out

    def remove_key(self, key_id: str) -> None:
        keys = [k["id"] for k in self.list_keys()]
        if key_id not in keys:
            raise NotFound(f"no key {key_id}", code="KEY_NOT_FOUND")
        if len(keys) == 1:
            raise InvalidInput("refusing to remove the vault's last key", code="VAULT_LAST_KEY")
        self.backend.delete(KEYS_PREFIX + key_id)

    # -- catalogue -------------------------------------------------------------------------------

    def backup_ids(self, prefix: str = "") -> list[BackupId]:
        return sorted(self.backup_objects(prefix))

    def backup_objects(self, prefix: str = "") -> dict[BackupId, ObjectInfo]:
        """Every backup's manifest object under ``prefix`` (its size and time say whether it is the one seen
        before)."""
        out = {}
        for info in self.backend.list(PREFIX + prefix):
            bid = BackupId.from_backup_key(info.key)
            if bid is not None:
                out[bid] = info
        return out

    def has_backup(self, backup_id: BackupId) -> bool:
        try:
            self.backend.stat(backup_id.backup_key)
        except NotFound:
            return False
        return True

    def read_manifest(self, backup_id: BackupId) -> Manifest:
        """A manifest up to MANIFEST_WHOLE bytes is read whole; a larger one (a large dense disk's: 32 bytes
        a chunk) a piece at a time, so that no command holds it whole, whatever the disk's size."""
        key = backup_id.backup_key
        try:
            size = self.backend.stat(key).size
            if size <= MANIFEST_WHOLE:
                return decode_manifest(self.backend.get(key), backup_id, self.crypto)
            first = self.backend.get_range(key, 0, sealed.STREAM_PIECE)
            return read_manifest_stream(lambda offset, n: self.backend.get_range(key, offset, n), size, first,
                                        backup_id, self.crypto)
        except NotFound:
            raise NotFound(f"no backup {backup_id} in the vault", code="BACKUP_NOT_FOUND") from None

    def read_metadata(self, backup_id: BackupId) -> dict[str, Any]:
        try:
            data = self.backend.get(backup_id.metadata_key)
        except NotFound:
            raise NotFound(f"no metadata for backup {backup_id}", code="BACKUP_NOT_FOUND") from None
        return decode_metadata(data, backup_id, self.crypto)

    def write_backup(self, manifest: Manifest, metadata: dict[str, Any]) -> None:
        """Metadata first, then the manifest: the ``Backup`` object is the commit point."""
        bid = manifest.id
        self.backend.put(bid.metadata_key, encode_metadata(bid, metadata, self.crypto), overwrite=True)
        try:
            if manifest.chunk_ids.in_file:  # a large disk's: sealed into a staged file, never held whole
                self.backend.put_file(bid.backup_key, self._staged_manifest(manifest))
            else:
                self.backend.put(bid.backup_key, encode_manifest(manifest, self.crypto))
        except AlreadyExists:
            raise AlreadyExists(f"backup {bid} already exists", code="BACKUP_EXISTS") from None

    def _staged_manifest(self, manifest: Manifest) -> Path:
        path = self.backend.staging_dir() / f"manifest-{os.getpid()}-{os.urandom(8).hex()}.partial"
        try:
            with open(path, "wb") as f:
                write_manifest(manifest, self.crypto, f.write)
        except OSError as exc:
            path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"no space left in {path.parent} for the manifest of {manifest.id}") from exc
            raise BackendError(f"cannot stage the manifest of {manifest.id} in {path.parent}: {exc}") from exc
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def delete_backup(self, backup_id: BackupId) -> None:
        if not self.backend.delete(backup_id.backup_key):
            raise NotFound(f"no backup {backup_id} in the vault", code="BACKUP_NOT_FOUND")
        self.backend.delete(backup_id.metadata_key)

    # -- index and packs -------------------------------------------------------------------------

    def _read_index(self, key: str) -> IndexFile:
        return decode_index(self.backend.get(key), self.crypto, what=key)

    def _read_index_or_error(self, key: str) -> IndexFile | str:
        try:
            return self._read_index(key)
        except (VaultCorrupt, VaultFormatUnsupported) as err:
            return f"{err.code}: {err.message}"

    def _read_index_checked(self, key: str, damaged: dict[str, str]) -> IndexFile | str:
        """As ``_read_index_or_error``, and an object whose bytes do not match its name is recorded in
        ``damaged`` but still used when it decodes (its entries may be all a backup has left)."""
        import blake3

        data = self.backend.get(key)
        wrong_name = blake3.blake3(data).hexdigest() != key[len(INDEX_PREFIX) :]
        problem = "content does not match its name (damaged)" if wrong_name else None
        try:
            f = decode_index(data, self.crypto, what=key)
        except (VaultCorrupt, VaultFormatUnsupported) as err:
            error = f"{err.code}: {err.message}"
            return f"{problem}; {error}" if problem else error
        if problem:
            damaged[key] = problem
        return f

    def load_index(self, *, tolerant: bool = False, only: IdSet | None = None, ids: bool = False,
                   check_names: bool = False, locate: ChunkLocator | None = None) -> ChunkIndex:
        """Every chunk's location, or with ``only`` those of these chunks (a restore's: its memory then
        follows the backup, not the vault), or with ``locate`` those of its ids, filled in in place (it is
        then the result's ``locations``); with ``ids``, also every stored chunk id (``ids``: what a
        backup deduplicates against, ~40 bytes a chunk against a location's ~58). ``tolerant``: skip
        unreadable index objects (listed in ``damaged``) rather than fail; their chunks then look
        absent, which backup and restore can live with. ``check_names`` (verify; implies tolerant):
        also hash each object against its name, listing a mismatch in ``damaged`` but still using the
        object if it decodes.

        Memory stays near the table's own: objects are read in batches, and those beyond
        INDEX_HOLD_BYTES are read a second time (what each object supersedes must be known before
        any of its entries count) instead of all being held at once."""
        return retry_index_read(lambda: self._load_index(tolerant or check_names, only, ids, check_names, locate))

    def _load_index(self, tolerant: bool, only: IdSet | None, ids: bool, check_names: bool,
                    locate: ChunkLocator | None) -> ChunkIndex:
        index = ChunkIndex() if locate is None else ChunkIndex(locations=locate)
        if locate is not None:
            locate.forget_locations()  # an attempt that started over must not keep a gone object's rows
        scan = self.scan_index(index.damaged if tolerant else None, check_names=check_names)
        if locate is None:
            index.locations.reserve(scan.live_entries if only is None else min(len(only), scan.live_entries))
        if ids:
            index.ids = new_id_set(scan.live_entries, "the vault's chunk ids")
        # A few wanted ids (a backup's parent chunks) are tested in a plain set: C-speed, against a
        # million rows; many (a restore's) stay compact.
        keep: Container[bytes] | None = set(only) if only is not None and len(only) <= SMALL_FILTER else only
        try:
            for index_id, f in scan.live():
                if index.ids is not None:
                    index.ids.update(map(itemgetter(0), f.rows()))
                if locate is not None:
                    locate.locate_rows(f.rows())
                elif only is None or only:
                    index.locations.update_rows(f.rows(), keep=keep)
                index.index_ids.add(index_id)
            if isinstance(index.ids, DiskIdSet):
                index.ids.finish()
        except BaseException:
            index.close()
            raise
        return index

    def index_keys(self) -> set[str]:
        """The keys of every index object now."""
        return {info.key for info in self.backend.list(INDEX_PREFIX)}

    def ids_in_index(self, keys: list[str]) -> IdSet:
        """The chunk ids the index objects ``keys`` list. An object gone meanwhile (merged into another) or
        unreadable lists none: its chunks then look absent, so they are stored again, never referenced unseen."""
        ids = IdSet()
        for key in keys:
            try:
                f = self._read_index_or_error(key)
            except NotFound:
                continue
            if not isinstance(f, str):
                ids.update(map(itemgetter(0), f.rows()))
        return ids

    def scan_index(self, damaged: dict[str, str] | None = None, *, check_names: bool = False) -> IndexScan:
        """Every index object read once, to learn which are superseded; ``live()`` then gives the others
        one at a time. An object that does not decode raises VAULT_CORRUPT, or with ``damaged`` given is
        recorded there (key -> error) and left out. NotFound, from either pass: list again (a gc or a
        backup merging its index deleted an object after writing what replaces it). ``check_names``
        (needs ``damaged``): see ``load_index``."""
        read: Callable[[str], IndexFile | str]
        if check_names:
            assert damaged is not None
            read = functools.partial(self._read_index_checked, damaged=damaged)
        else:
            read = self._read_index if damaged is None else self._read_index_or_error
        scan = IndexScan(read)
        room = INDEX_HOLD_BYTES
        for key, f in self._read_all(list(self.backend.list(INDEX_PREFIX)), read):
            if isinstance(f, str):
                assert damaged is not None
                damaged[key] = f
                continue
            scan.counts[key[len(INDEX_PREFIX) :]] = len(f)
            scan.superseded.update(s.hex() for s in f.supersedes)
            if len(f.records) <= room:
                scan.held[key] = f
                room -= len(f.records)
        scan.damaged = damaged
        return scan

    def _read_all(self, objects: list[ObjectInfo], read: Callable[[str], T]) -> Iterator[tuple[str, T]]:
        """(key, read(key)) for every object, in order; in parallel batches when there are many. A batch
        is at most INDEX_READ_INLINE objects and INDEX_BATCH_BYTES: its results are all held at once."""
        if len(objects) <= INDEX_READ_INLINE:
            for info in objects:
                yield info.key, read(info.key)
            return
        batches: list[list[str]] = [[]]
        size = 0
        for info in objects:
            if batches[-1] and (len(batches[-1]) >= INDEX_READ_INLINE or size + info.size > INDEX_BATCH_BYTES):
                batches.append([])
                size = 0
            batches[-1].append(info.key)
            size += info.size
        with ThreadPoolExecutor(max_workers=8) as pool:
            for batch in batches:
                yield from zip(batch, pool.map(read, batch), strict=True)

    def write_index(self, entries: Mapping[bytes, Location] | bytes | bytearray,
                    supersedes: list[bytes] | None = None) -> str:
        """Store an index object of ``entries`` (a mapping, or rows packed by ``index_rows``); its id."""
        import blake3

        data = encode_index(entries, self.crypto, supersedes)
        index_id = blake3.blake3(data).hexdigest()
        try:
            self.backend.put(index_key(index_id), data)
        except AlreadyExists:
            pass  # same content, same name: already durable
        return index_id

    def read_blob(self, loc: Location) -> bytes:
        return self.backend.get_range(pack_key(loc.pack_id.hex()), loc.offset, loc.stored_length)

    def condemned_chunks(self) -> IdSet | DiskIdSet:
        """Chunks a running gc is about to delete; a backup must not reuse them (format.md §11). Past
        IDS_IN_MEMORY of them (a gc after a large prune) a ``DiskIdSet``: ``close`` it when done."""
        live_gc = {lock.id for lock in self.locks.active()}
        lists = [info for info in self.backend.list(LOCKS_PREFIX) if info.key.endswith(CONDEMNED_SUFFIX)
                 and info.key[len(LOCKS_PREFIX) : -len(CONDEMNED_SUFFIX)] in live_gc]
        out = new_id_set(sum(info.size for info in lists) // ID_SIZE, "the chunks a gc condemned")
        try:
            for info in lists:
                try:
                    data = self.backend.get(info.key)
                except NotFound:
                    continue
                out.update(data[i : i + ID_SIZE] for i in range(0, len(data) - ID_SIZE + 1, ID_SIZE))
            if isinstance(out, DiskIdSet):
                out.finish()
        except BaseException:
            if isinstance(out, DiskIdSet):
                out.close()
            raise
        return out

    def read_pack_header(self, pack_id: str, size: int) -> list[PackEntry]:
        """A pack's entries from two ranged reads of its tail, without reading its blobs."""
        key = pack_key(pack_id)
        if size < PACK_PREAMBLE_SIZE + 4:
            raise VaultCorrupt(f"{key}: truncated pack", object=key)
        (hlen,) = struct.unpack("<I", self.backend.get_range(key, size - 4, 4))
        blob_end = size - 4 - hlen
        if blob_end < PACK_PREAMBLE_SIZE:
            raise VaultCorrupt(f"{key}: header length {hlen} exceeds the pack", object=key)
        return decode_header_bytes(self.backend.get_range(key, blob_end, hlen), blob_end, self.crypto, what=key)

    def iter_packs(self) -> Iterator[tuple[str, int, float]]:
        for info in self.backend.list(DATA_PREFIX):
            yield info.key.rsplit("/", 1)[-1], info.size, info.mtime
