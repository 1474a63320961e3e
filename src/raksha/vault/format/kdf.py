"""A user's secret and the Argon2id derivation of a passphrase (format.md §4).

Kept apart from ``keys`` and light to import (no dataclasses, no cryptography): a CLI command starts
deriving its key here before it loads the vault engine, and the derivation then overlaps that
loading. libargon2 releases the GIL and runs the lanes in threads (ADR 0016).
"""

from __future__ import annotations

import base64
import json
import mmap
import os
import threading
from collections.abc import Iterable
from typing import Any, NamedTuple

from _argon2_cffi_bindings import ffi, lib

from raksha.domain.errors import InvalidInput, VaultCorrupt

KEY_SIZE = 32
MADV_POPULATE_WRITE = 23  # Linux 5.14; Python 3.11's mmap does not name it


class KdfParams(NamedTuple):
    """Argon2id costs of a new key file. The defaults follow OWASP's 64 MiB / t=3 guidance."""

    memory_kib: int = 65536
    iterations: int = 3
    lanes: int = 4


class Secret:
    """What a user holds: a passphrase, or the bytes of a key file. Its repr shows neither."""

    __slots__ = ("keyfile", "passphrase")

    def __init__(self, passphrase: bytes | None = None, keyfile: bytes | None = None) -> None:
        if (passphrase is None) == (keyfile is None):
            raise ValueError("a secret is a passphrase or a key file, not both")
        if passphrase is not None and not passphrase:
            raise InvalidInput("the passphrase is empty", code="VAULT_KEY_EMPTY")
        if keyfile is not None and len(keyfile) < 32:
            raise InvalidInput("a key file must hold at least 32 bytes", code="VAULT_KEY_EMPTY")
        self.passphrase = passphrase
        self.keyfile = keyfile

    def __repr__(self) -> str:
        return f"Secret({'passphrase' if self.passphrase is not None else 'keyfile'}=...)"


_in_use = threading.local()  # the map the derivation running in this thread was given


def _populated_map(size: int) -> mmap.mmap | None:
    """The derivation's memory: a private map of ``size`` bytes in huge pages where the kernel gives
    them, populated in one call; None if it cannot be mapped (libargon2 then allocates its own, and
    says so if it cannot).

    Argon2id fills its memory in its first pass. In 4 KiB pages that is 16,384 page faults, ~15 ms of
    a ~70 ms derivation here; in 2 MiB pages the 64 MiB are 32, populated in ~3 ms (ADR 0016)."""
    try:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, OverflowError):  # libargon2 rejects such a size itself
        return None
    for advice in (mmap.MADV_HUGEPAGE, MADV_POPULATE_WRITE):
        try:
            buf.madvise(advice)
        except OSError:  # no transparent huge pages; a kernel before 5.14: libargon2's touches fault them in
            pass
    return buf


def _allocate_in_map(memory: Any, size: int) -> int:
    buf: mmap.mmap | None = getattr(_in_use, "buf", None)
    if buf is None or len(buf) < size:
        memory[0] = ffi.NULL  # libargon2 reports ARGON2_MEMORY_ALLOCATION_ERROR
        return int(lib.ARGON2_MEMORY_ALLOCATION_ERROR)
    memory[0] = ffi.cast("uint8_t *", ffi.from_buffer(buf))
    return int(lib.ARGON2_OK)


def _keep_map(memory: Any, size: int) -> None:
    """libargon2 has wiped the memory; the map is unmapped by the derivation that took it."""


# libargon2 calls these to get and give back its memory (argon2_context's allocate_cbk and free_cbk).
_allocate = ffi.callback("int(uint8_t **, size_t)", _allocate_in_map)
_free = ffi.callback("void(uint8_t *, size_t)", _keep_map)


def _threads(lanes: int) -> int:
    """Threads for a derivation of ``lanes`` lanes: no more than the cores. The result does not depend on
    it; four lanes in four threads on two cores took 200-204 ms, in two 182-186 ms (64 MiB, t=3)."""
    return max(1, min(lanes, os.cpu_count() or 1))


def _argon2(buf: mmap.mmap | None, passphrase: bytes, salt: bytes, iterations: int, memory_kib: int, lanes: int,
            out: Any) -> int:
    """``argon2_hash``'s derivation, in ``buf`` (else in memory libargon2 allocates), in ``_threads``."""
    pwd, salt_c = ffi.from_buffer(passphrase), ffi.from_buffer(salt)
    ctx = ffi.new("argon2_context *")
    ctx.out, ctx.outlen = out, KEY_SIZE
    ctx.pwd, ctx.pwdlen = pwd, len(passphrase)
    ctx.salt, ctx.saltlen = salt_c, len(salt)
    ctx.t_cost, ctx.m_cost, ctx.lanes, ctx.threads = iterations, memory_kib, lanes, _threads(lanes)
    ctx.version, ctx.flags = lib.ARGON2_VERSION_13, lib.ARGON2_DEFAULT_FLAGS
    if buf is None:
        return int(lib.argon2_ctx(ctx, lib.Argon2_id))
    ctx.allocate_cbk, ctx.free_cbk = _allocate, _free
    _in_use.buf = buf
    try:
        return int(lib.argon2_ctx(ctx, lib.Argon2_id))
    finally:
        _in_use.buf = None


def derive_argon2(passphrase: bytes, kdf: dict[str, Any]) -> bytes:
    """The key that ``passphrase`` gives under a key file's ``kdf`` parameters."""
    try:
        salt = base64.b64decode(kdf["salt"])
        costs = int(kdf["iterations"]), int(kdf["memory_kib"]), int(kdf["lanes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise VaultCorrupt(f"key file: malformed Argon2id parameters: {exc}") from None
    if not all(0 <= cost < 1 << 32 for cost in costs):  # libargon2 takes them as uint32_t
        raise VaultCorrupt(f"key file: Argon2id parameters rejected: costs out of range {costs}")
    out = ffi.new("uint8_t[]", KEY_SIZE)
    buf = _populated_map(costs[1] * 1024)
    try:
        rc = _argon2(buf, passphrase, salt, *costs, out)
    finally:
        if buf is not None:
            buf.close()
    if rc != lib.ARGON2_OK:
        message = ffi.string(lib.argon2_error_message(rc)).decode()
        raise VaultCorrupt(f"key file: Argon2id parameters rejected: {message}")
    return bytes(ffi.buffer(out, KEY_SIZE))


class _Pending:
    """One derivation running in the background; its result or its error, once."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: bytes | None = None
        self._error: BaseException | None = None

    def settle(self, value: bytes | None, error: BaseException | None) -> None:
        self._value, self._error = value, error
        self._done.set()

    def result(self) -> bytes:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


# Derivations started by ``prefetch``, by passphrase and parameters; each taken once by ``derive``.
_pending: dict[tuple[bytes, str, int, int, int], _Pending] = {}
_pending_lock = threading.Lock()


def _pending_key(passphrase: bytes, kdf: dict[str, Any]) -> tuple[bytes, str, int, int, int]:
    return (passphrase, str(kdf["salt"]), int(kdf["iterations"]), int(kdf["lanes"]), int(kdf["memory_kib"]))


def prefetch(key_files: Iterable[bytes], secret: Secret) -> None:
    """Start deriving, in a background thread, what ``secret`` gives for each Argon2id key file, so
    the derivation (~0.2 s with the default costs) overlaps whatever the caller does next. ``derive``
    then takes the result instead of deriving again. Malformed key files are skipped here and
    reported when the key is unwrapped."""
    if secret.passphrase is None:
        return
    passphrase = secret.passphrase
    jobs: list[tuple[dict[str, Any], _Pending]] = []
    with _pending_lock:
        for data in key_files:
            try:
                kdf = json.loads(data)["kdf"]
                key = _pending_key(passphrase, kdf) if kdf.get("algorithm") == "argon2id" else None
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if key is not None and key not in _pending:
                _pending[key] = pending = _Pending()
                jobs.append((kdf, pending))
    if not jobs:
        return

    def run() -> None:
        for kdf, pending in jobs:
            try:
                pending.settle(derive_argon2(passphrase, kdf), None)
            except BaseException as exc:  # raised again by whoever takes the result
                pending.settle(None, exc)

    threading.Thread(target=run, name="raksha-kdf", daemon=True).start()


def derive(passphrase: bytes, kdf: dict[str, Any]) -> bytes:
    """``derive_argon2``, or the result ``prefetch`` started for the same passphrase and parameters."""
    try:
        key = _pending_key(passphrase, kdf)
    except (KeyError, TypeError, ValueError) as exc:
        raise VaultCorrupt(f"key file: malformed Argon2id parameters: {exc}") from None
    with _pending_lock:
        pending = _pending.pop(key, None)
    return pending.result() if pending is not None else derive_argon2(passphrase, kdf)
