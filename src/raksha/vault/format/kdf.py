"""A user's secret and the Argon2id derivation of a passphrase (format.md §4).

Kept apart from ``keys`` and light to import (no dataclasses, no cryptography): a CLI command starts
deriving its key here before it loads the vault engine, and the derivation then overlaps that
loading. libargon2 releases the GIL and runs the lanes in threads (ADR 0016).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterable
from typing import Any, NamedTuple

from _argon2_cffi_bindings import ffi, lib

from raksha.domain.errors import InvalidInput, VaultCorrupt

KEY_SIZE = 32


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


def derive_argon2(passphrase: bytes, kdf: dict[str, Any]) -> bytes:
    """The key that ``passphrase`` gives under a key file's ``kdf`` parameters."""
    try:
        salt = base64.b64decode(kdf["salt"])
        costs = int(kdf["iterations"]), int(kdf["memory_kib"]), int(kdf["lanes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise VaultCorrupt(f"key file: malformed Argon2id parameters: {exc}") from None
    out = ffi.new("uint8_t[]", KEY_SIZE)
    rc = lib.argon2_hash(*costs, passphrase, len(passphrase), salt, len(salt), out, KEY_SIZE,
                         ffi.NULL, 0, lib.Argon2_id, lib.ARGON2_VERSION_13)
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
