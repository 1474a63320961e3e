"""``raksha vault ...``: the low-level tool over the vault engine (the service uses the same engine)."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from raksha.cli.output import TerminalProgress, emit, human_bytes, table
from raksha.cli.secrets import resolve_secret
from raksha.domain.errors import EXIT_DAMAGED, EXIT_ERROR, InvalidInput, RakshaError, VaultKeyError
from raksha.vault.format.constants import KEYS_PREFIX
from raksha.vault.format.kdf import KdfParams, prefetch

if TYPE_CHECKING:
    from raksha.vault.backends import Backend
    from raksha.vault.repository import Vault
    from raksha.vault.sources.base import ExtentArray

# The vault, engine and operations are imported by each command, most while the vault's key derives
# (VaultOpening): they and the derivation each take ~0.1 s, and overlap. What this module imports
# itself comes before the derivation starts, so it stays light (no dataclasses, no cryptography).

_SIZE = re.compile(r"^(\d+)([KMG]i?B?)?$", re.I)


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1M, 4MiB, 65536)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[(m[2] or "")[:1].lower()]
    return int(m[1]) * mult


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _duration(text: str) -> float:
    m = re.match(r"^(\d+(?:\.\d+)?)([smhd]?)$", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 10m, 1h, 2d)")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


def _data_subset(text: str) -> Any:
    from raksha.domain.data_subset import DataSubset

    try:
        return DataSubset.parse(text)
    except InvalidInput as err:
        raise argparse.ArgumentTypeError(err.message) from None


def _common(p: argparse.ArgumentParser, *, secret: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    if secret:
        p.add_argument("--password-file", metavar="FILE", help="read the vault passphrase from FILE")
        p.add_argument("--key-file", metavar="FILE", help="use FILE's bytes as the vault key")


THREADS_HELP = {
    "backup": "threads (default: two per core); the source is read with half of them, or with up to N when "
              "its reads are small (up to 8 by default)",
    "restore": "threads (default: 2 reading the vault, one per core decoding, 2 writing; N is split among the "
               "three, at least one each)",
    "verify": "threads (default: one per core)",
    "compare": "threads reading and hashing the image (default: two per core)",
}


def _progress_opt(p: argparse.ArgumentParser, *, threads: str | None = None) -> None:
    p.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                   help="progress on stderr: a bar on a terminal by default")
    if threads is not None:
        p.add_argument("--threads", type=_positive_int, default=None, metavar="N", help=THREADS_HELP[threads])


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    vault = sub.add_parser("vault", help="work on a vault directly (init, backup, restore, verify, ...)")
    vsub = vault.add_subparsers(dest="vault_command", metavar="ACTION", required=True)

    p = vsub.add_parser("init", help="create a vault")
    p.add_argument("dir")
    p.add_argument("--encrypt", action="store_true", help="encrypt with a passphrase or key file")
    p.add_argument("--chunk-size", type=parse_size, default=1 << 20, help="power of two, 64K..64M (default 1M)")
    p.add_argument("--compression-level", type=int, default=1, help="zstd level (default 1)")
    p.add_argument("--kdf-memory", type=parse_size, default=64 << 20, help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(func=cmd_init)

    p = vsub.add_parser("backup", help="back up a disk image (full, or incremental with --parent)")
    p.add_argument("dir")
    p.add_argument("image")
    p.add_argument("--id", required=True, help="JOB/RUN/VM/DISK")
    p.add_argument("--parent", help="backup id this one is incremental to")
    p.add_argument("--changed-extents", metavar="FILE", help="JSON list of [offset, length] changed since --parent")
    p.add_argument("--format", default="auto",
                   help="source format (raw, qcow2, ...: trusted as said; auto guesses, and refuses an image "
                        "it guesses to name other files)")
    p.add_argument("--hint", action="append", default=[], metavar="KEY=VALUE", help="free-form metadata")
    _progress_opt(p, threads="backup")
    _common(p)
    p.set_defaults(func=cmd_backup)

    p = vsub.add_parser("restore", help="restore a backup to a new image file, or over one in place")
    p.add_argument("dir")
    p.add_argument("id")
    p.add_argument("output")
    p.add_argument("--format", choices=["raw", "qcow2"], default="raw")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--since", metavar="ID",
                   help="OUTPUT exists and holds backup ID except in --changed-extents: write only what differs, "
                        "in place")
    p.add_argument("--changed-extents", metavar="FILE",
                   help="with --since: JSON list of [offset, length] written to OUTPUT since that backup")
    _progress_opt(p, threads="restore")
    _common(p)
    p.set_defaults(func=cmd_restore)

    p = vsub.add_parser("compare", help="read an image back and say whether it holds a backup, chunk by chunk")
    p.add_argument("dir")
    p.add_argument("id")
    p.add_argument("image")
    p.add_argument("--format", default="auto", help="the image's format (raw, qcow2, ...; auto guesses)")
    _progress_opt(p, threads="compare")
    _common(p)
    p.set_defaults(func=cmd_compare)

    p = vsub.add_parser("list", help="list backups, from the vault alone")
    p.add_argument("dir")
    p.add_argument("--prefix", default="", help="only ids starting with this (e.g. JOB/)")
    _common(p)
    p.set_defaults(func=cmd_list)

    p = vsub.add_parser("verify", help="re-read and re-hash everything; name damaged backups")
    p.add_argument("dir")
    reading = p.add_mutually_exclusive_group()
    reading.add_argument("--no-read-data", action="store_true", help="check structure and presence only")
    reading.add_argument("--read-data-subset", type=_data_subset, metavar="n/t|p%",
                         help="read the data of only some packs, the others checked for presence and size: "
                              "n/t the n-th of t groups (1/7 ... 7/7 read every pack once), p%% a random share")
    _progress_opt(p, threads="verify")
    _common(p)
    p.set_defaults(func=cmd_verify)

    p = vsub.add_parser("prune", help="delete backups by a retention policy (then run gc to free space)")
    p.add_argument("dir")
    for unit in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(f"--keep-{unit}", type=int, default=0, metavar="N")
    p.add_argument("--keep-within", type=_duration, default=None, metavar="DURATION")
    p.add_argument("--prefix", default="", help="only backups whose id starts with this")
    p.add_argument("--dry-run", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_prune)

    p = vsub.add_parser("delete", help="delete one backup (its data is freed by gc)")
    p.add_argument("dir")
    p.add_argument("id")
    _common(p)
    p.set_defaults(func=cmd_delete)

    p = vsub.add_parser("gc", help="free space no backup uses; safe while backups run")
    p.add_argument("dir")
    p.add_argument("--grace", type=_duration, default=3600.0, help="never delete data younger than this (1h)")
    p.add_argument("--max-wait", type=_duration, default=600.0, help="wait this long for running backups (10m)")
    p.add_argument("--repack-threshold", type=float, default=0.25, help="repack packs with this garbage share")
    p.add_argument("--dry-run", action="store_true")
    _common(p)
    _progress_opt(p)
    p.set_defaults(func=cmd_gc)

    p = vsub.add_parser("rebuild-index", help="rebuild the index from the packs alone (disaster recovery)")
    p.add_argument("dir")
    _common(p)
    p.set_defaults(func=cmd_rebuild_index)

    p = vsub.add_parser("key", help="manage the keys of an encrypted vault (no data is re-encrypted)")
    ksub = p.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    for name, func, text in (("list", cmd_key_list, "list keys"),
                             ("add", cmd_key_add, "add a passphrase or key file"),
                             ("passwd", cmd_key_passwd, "change the passphrase"),
                             ("remove", cmd_key_remove, "remove a key")):
        kp = ksub.add_parser(name, help=text)
        kp.add_argument("dir")
        if name == "remove":
            kp.add_argument("key_id")
        if name in ("add", "passwd"):
            kp.add_argument("--new-password-file", metavar="FILE")
            kp.add_argument("--new-key-file", metavar="FILE")
            kp.add_argument("--kdf-memory", type=parse_size, default=64 << 20, help=argparse.SUPPRESS)
        _common(kp)
        kp.set_defaults(func=func)


# -- helpers --------------------------------------------------------------------------------------


class VaultOpening:
    """A vault whose key has started deriving in the background: the command checks the rest of its
    arguments and imports what it runs next meanwhile, then calls ``open``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.secret = resolve_secret(args.password_file, args.key_file, required=False)
        self.key_files: list[bytes] | None = None  # read once, for the derivation and the opening
        derives = self.secret is not None and self.secret.passphrase is not None  # a key file derives nothing
        from raksha.vault.backends import open_backend

        self.backend = open_backend(args.dir)
        if derives:
            assert self.secret is not None
            self.key_files = _key_files(self.backend)
            prefetch(self.key_files or [], self.secret)

    def open(self, *modules: str) -> Vault:
        """The vault, unlocked, once ``modules`` are imported."""
        from raksha.vault.repository import Vault

        for module in modules:
            importlib.import_module(module)
        try:
            return Vault.open(self.backend, self.secret, key_files=self.key_files)
        except VaultKeyError as err:
            if err.code != "VAULT_KEY_REQUIRED":
                raise
        return Vault.open(self.backend, resolve_secret(self.args.password_file, self.args.key_file, required=True))


def open_vault(args: argparse.Namespace, *modules: str) -> Vault:
    """The vault at ``args.dir``, unlocked; its key derives while ``modules`` are imported."""
    return VaultOpening(args).open(*modules)


def _key_files(backend: Backend) -> list[bytes] | None:
    """The vault's key files, or None if they cannot be read now (opening the vault reads them and says why)."""
    try:
        return [backend.get(info.key) for info in backend.list(KEYS_PREFIX)]
    except RakshaError:
        return None


def _with_progress(args: argparse.Namespace, fn: Callable[[Any], Any]) -> Any:
    mode = "none" if args.json and args.progress == "auto" else args.progress
    bar = TerminalProgress(mode=mode)
    try:
        return fn(bar.callback())
    finally:
        bar.close()


_INT = rb"(0|[1-9][0-9]*)"
_EXTENT = re.compile(rb"\[\s*" + _INT + rb"\s*,\s*" + _INT + rb"\s*\]")
_OPEN, _CLOSE = re.compile(rb"\s*\[\s*"), re.compile(rb"\s*\]\s*")


def _read_extents(path: str) -> Sequence[tuple[int, int]]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}", code="EXTENTS_INVALID") from None
    fast = _scan_extents(data)
    if fast is not None:
        return fast
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise InvalidInput(f"{path}: not JSON: {exc}", code="EXTENTS_INVALID") from None
    ok = isinstance(doc, list) and all(
        isinstance(e, list) and len(e) == 2 and all(type(x) is int and x >= 0 for x in e) for e in doc)
    if not ok:
        raise InvalidInput(f"{path}: expected a JSON list of [offset, length] pairs of non-negative integers",
                           code="EXTENTS_INVALID")
    return [(int(e[0]), int(e[1])) for e in doc]


def _scan_extents(data: bytes) -> ExtentArray | None:
    """A plain ``[[offset, length], ...]`` document straight into arrays (16 bytes an extent; as JSON
    objects a dirty bitmap's half million extents took ~130 MB). None for anything else, which the
    JSON path then reads or rejects with its own message."""
    from raksha.vault.sources.base import ExtentArray

    opened = _OPEN.match(data)
    if opened is None:
        return None
    out, pos = ExtentArray(), opened.end()
    try:
        for m in _EXTENT.finditer(data, pos):
            if data[pos : m.start()].strip() != (b"," if out else b""):
                return None
            out.append(int(m[1]), int(m[2]))
            pos = m.end()
    except OverflowError:  # past 64 bits: let the JSON path say what is wrong
        return None
    if _CLOSE.fullmatch(data, pos) is None:
        return None
    return out


def _hints(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--hint {item!r}: expected KEY=VALUE", code="INVALID_HINT")
        out[key] = value
    return out


# -- commands -------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from raksha.vault.backends import open_backend
    from raksha.vault.format.config import VaultConfig
    from raksha.vault.repository import Vault

    config = VaultConfig.new(chunk_size=args.chunk_size, compression_level=args.compression_level,
                             encrypted=args.encrypt)
    secret = resolve_secret(args.password_file, args.key_file, required=True, confirm=True) if args.encrypt else None
    kdf = KdfParams(memory_kib=max(8, args.kdf_memory // 1024))
    vault = Vault.init(open_backend(args.dir, create=True), config, secret, kdf)
    emit({"vault": args.dir, "vault_id": config.vault_id, "encrypted": config.encrypted,
          "chunk_size": config.chunk_size}, args.json,
         f"created {'encrypted ' if config.encrypted else ''}vault {config.vault_id} at {vault.backend.url}")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    opening = VaultOpening(args)
    from raksha.vault.format.naming import BackupId
    from raksha.vault.sources.open import open_source

    backup_id = BackupId.parse(args.id)
    parent = BackupId.parse(args.parent) if args.parent else None
    extents = _read_extents(args.changed_extents) if args.changed_extents else None
    hints = _hints(args.hint)
    source = open_source(args.image, args.format)  # its format probe (qemu-img) runs while the key derives
    try:
        vault = opening.open("raksha.vault.engine.backup")
        from raksha.vault.engine.backup import backup_disk

        result = _with_progress(args, lambda cb: backup_disk(
            vault, source, backup_id, parent=parent, changed_extents=extents, threads=args.threads,
            progress=cb, hints=hints))
    finally:
        source.close()
    d = result.to_dict()
    emit(d, args.json,
         f"{result.kind} backup {backup_id}: read {human_bytes(d['bytes_read'])} of {human_bytes(d['virtual_size'])}"
         f" in {d['seconds']:.2f} s ({d['read_mb_s']} MB/s), stored {human_bytes(d['bytes_stored'])} new; "
         f"chunks: {d['chunks_new']} new, {d['chunks_deduplicated']} deduplicated, "
         f"{d['chunks_from_parent']} unchanged, {d['chunks_zero']} zero"
         + (f", {d['chunks_delta']} changed in part (only the change stored"
            + (f"; {d['chunks_merged']} with their earlier layers merged" if d["chunks_merged"] else "") + ")"
            if d["chunks_delta"] else ""))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    opening = VaultOpening(args)
    from raksha.vault.format.naming import BackupId

    backup_id = BackupId.parse(args.id)
    if args.changed_extents and not args.since:
        raise InvalidInput("--changed-extents needs --since: the backup OUTPUT holds outside them",
                           code="INVALID_INPUT")
    since = BackupId.parse(args.since) if args.since else None
    extents = _read_extents(args.changed_extents) if args.changed_extents else []
    vault = opening.open("raksha.vault.engine.restore")
    from raksha.vault.engine.restore import restore_backup, restore_over

    if since is not None:
        result = _with_progress(args, lambda cb: restore_over(
            vault, backup_id, args.output, since, extents, fmt=args.format, threads=args.threads, progress=cb))
    else:
        result = _with_progress(args, lambda cb: restore_backup(
            vault, backup_id, args.output, fmt=args.format, overwrite=args.force, threads=args.threads,
            progress=cb))
    d = result.to_dict()
    how = f"over {args.output} in place, writing {human_bytes(d['bytes_written'])}" if since else f"to {args.output}"
    emit(d, args.json, f"restored {backup_id} {how} ({args.format}, {human_bytes(d['virtual_size'])}) "
         f"in {d['seconds']:.2f} s; {d['chunks_verified']} chunks verified against their ids")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    opening = VaultOpening(args)
    from raksha.vault.format.naming import BackupId
    from raksha.vault.sources.open import open_source

    backup_id = BackupId.parse(args.id)
    source = open_source(args.image, args.format)
    try:
        vault = opening.open("raksha.vault.operations.compare")
        from raksha.vault.operations.compare import compare_image

        report = _with_progress(args, lambda cb: compare_image(vault, backup_id, source, threads=args.threads,
                                                               progress=cb))
    finally:
        source.close()
    emit(report.to_dict(), args.json, report.summary())
    return 0 if report.identical else EXIT_ERROR


def cmd_list(args: argparse.Namespace) -> int:
    vault = open_vault(args, "raksha.vault.operations.catalog")
    from raksha.vault.operations.catalog import list_backups

    rows = list_backups(vault, args.prefix)
    emit(rows, args.json, table(
        [[r["id"], r["kind"], r["created"][:19], human_bytes(r["virtual_size"]), r["parent"] or "-"] for r in rows],
        ["ID", "KIND", "CREATED", "SIZE", "PARENT"]) if rows else "no backups")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    vault = open_vault(args, "raksha.vault.operations.verify")
    from raksha.vault.operations.verify import verify_vault

    report = _with_progress(args, lambda cb: verify_vault(
        vault, read_data=not args.no_read_data, subset=args.read_data_subset, threads=args.threads, progress=cb))
    emit(report.to_dict(), args.json, report.summary())
    return 0 if report.ok else EXIT_DAMAGED


def cmd_prune(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from raksha.domain.retention import RetentionPolicy

    policy = RetentionPolicy(keep_last=args.keep_last, keep_hourly=args.keep_hourly, keep_daily=args.keep_daily,
                             keep_weekly=args.keep_weekly, keep_monthly=args.keep_monthly,
                             keep_yearly=args.keep_yearly,
                             keep_within=timedelta(seconds=args.keep_within) if args.keep_within else None)
    vault = open_vault(args, "raksha.vault.operations.prune")
    from raksha.vault.operations.prune import prune

    report = prune(vault, policy, prefix=args.prefix, dry_run=args.dry_run)
    emit(report.to_dict(), args.json, report.summary())
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    opening = VaultOpening(args)
    from raksha.vault.format.naming import BackupId
    from raksha.vault.locks import LockKind

    backup_id = BackupId.parse(args.id)
    vault = opening.open()
    with vault.locks.acquire(LockKind.SHARED, f"delete {backup_id}"):
        vault.delete_backup(backup_id)
    emit({"deleted": str(backup_id)}, args.json, f"deleted {backup_id}; run 'raksha vault gc' to free its space")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    vault = open_vault(args, "raksha.vault.operations.gc")
    from raksha.vault.operations.gc import collect_garbage

    report = _with_progress(args, lambda cb: collect_garbage(
        vault, grace=args.grace, max_wait=args.max_wait, repack_threshold=args.repack_threshold,
        dry_run=args.dry_run, progress=cb))
    emit(report.to_dict(), args.json, report.summary())
    return 0


def cmd_rebuild_index(args: argparse.Namespace) -> int:
    from raksha.vault.operations.rebuild_index import rebuild_index

    report = rebuild_index(open_vault(args))
    emit(report.to_dict(), args.json, report.summary())
    return EXIT_DAMAGED if report.unreadable_packs else 0


def _new_secret(args: argparse.Namespace) -> Any:
    # Never from $RAKSHA_PASSWORD(_FILE): that is the current secret, and taking it as the new one
    # would make 'key passwd' succeed while changing nothing.
    if not (args.new_password_file or args.new_key_file) and not sys.stdin.isatty():
        raise InvalidInput("give the new secret with --new-password-file FILE or --new-key-file FILE "
                           "(or run on a terminal to be prompted)", code="NEW_SECRET_REQUIRED")
    return resolve_secret(args.new_password_file, args.new_key_file, required=True, confirm=True,
                          prompt="New passphrase: ", environ=False)


def cmd_key_list(args: argparse.Namespace) -> int:
    keys = open_vault(args).list_keys()
    emit(keys, args.json, table([[k["id"], k["kdf"], k["created"], k["hostname"] or ""] for k in keys],
                                ["ID", "KIND", "CREATED", "HOST"]))
    return 0


def cmd_key_add(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    key_id = vault.add_key(_new_secret(args), KdfParams(memory_kib=max(8, args.kdf_memory // 1024)))
    emit({"added": key_id}, args.json, f"added key {key_id}")
    return 0


def cmd_key_passwd(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    old = [k["id"] for k in vault.list_keys()]
    key_id = vault.add_key(_new_secret(args), KdfParams(memory_kib=max(8, args.kdf_memory // 1024)))
    # Remove only the keys the old secret opens; other users' keys stay.
    old_secret = resolve_secret(args.password_file, args.key_file, required=True)
    opened_by_old = vault.keys_opened_by(old_secret) if old_secret is not None else set()
    for k in old:
        if k in opened_by_old:
            vault.remove_key(k)
    emit({"added": key_id, "removed": sorted(set(old) & opened_by_old)}, args.json,
         f"passphrase changed: new key {key_id}; no data was re-encrypted")
    return 0


def cmd_key_remove(args: argparse.Namespace) -> int:
    vault = open_vault(args)
    vault.remove_key(args.key_id)
    emit({"removed": args.key_id}, args.json, f"removed key {args.key_id}")
    return 0
