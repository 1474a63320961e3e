"""Key files: the master key wrapped by a passphrase (Argon2id) or a key file (format.md §4)."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from raksha.domain.errors import InvalidInput, VaultCorrupt
from raksha.vault.format.constants import KEYFILE_CONTEXT, NONCE_SIZE
from raksha.vault.format.crypto import MasterKey

KEYS_PREFIX = "keys/"  # where a vault keeps its key files (format.md §4)


@dataclass(frozen=True)
class KdfParams:
    """Argon2id costs. The defaults follow OWASP's 64 MiB / t=3 guidance."""

    memory_kib: int = 65536
    iterations: int = 3
    lanes: int = 4


@dataclass(frozen=True)
class Secret:
    """What a user holds: a passphrase, or the bytes of a key file."""

    passphrase: bytes | None = None
    keyfile: bytes | None = None

    def __post_init__(self) -> None:
        if (self.passphrase is None) == (self.keyfile is None):
            raise ValueError("a secret is a passphrase or a key file, not both")
        if self.passphrase is not None and not self.passphrase:
            raise InvalidInput("the passphrase is empty", code="VAULT_KEY_EMPTY")
        if self.keyfile is not None and len(self.keyfile) < 32:
            raise InvalidInput("a key file must hold at least 32 bytes", code="VAULT_KEY_EMPTY")


def _aad(vault_id: str) -> bytes:
    return f"raksha-master-key:{vault_id}".encode()


# One Argon2id derivation at a time in a process: two at once in two threads never return with the
# cryptography 50 wheels (OpenSSL 4.0) (both threads block before computing anything; reproduced with
# nothing but two Argon2id(...).derive calls). The service opens vaults from several threads.
_ARGON2 = threading.Lock()


# Derivations started ahead by ``prefetch_keks``, by passphrase and parameters; taken once used.
_prefetched: dict[tuple[bytes, str, int, int, int], Future[bytes]] = {}
_prefetched_lock = threading.Lock()


def _argon2_key(passphrase: bytes, kdf: dict[str, Any]) -> tuple[bytes, str, int, int, int]:
    return (passphrase, str(kdf["salt"]), int(kdf["iterations"]), int(kdf["lanes"]), int(kdf["memory_kib"]))


def prefetch_keks(key_files: Iterable[bytes], secret: Secret) -> None:
    """Start deriving, in a background thread, what ``secret`` gives for each Argon2id key file, so
    the derivation (0.13 s with the default costs) overlaps whatever the caller does next: a CLI
    command loads the modules it needs meanwhile. ``unwrap_master_key`` then takes the result
    instead of deriving again. Malformed key files are skipped here and reported by the unwrap."""
    if secret.passphrase is None:
        return
    jobs: list[tuple[dict[str, Any], Future[bytes]]] = []
    with _prefetched_lock:
        for data in key_files:
            try:
                kdf = json.loads(data)["kdf"]
                key = _argon2_key(secret.passphrase, kdf) if kdf.get("algorithm") == "argon2id" else None
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if key is not None and key not in _prefetched:
                future: Future[bytes] = Future()
                _prefetched[key] = future
                jobs.append((kdf, future))
    if not jobs:
        return

    def derive() -> None:
        for kdf, future in jobs:
            try:
                future.set_result(_derive_argon2(secret, kdf))
            except BaseException as exc:  # raised again by whoever takes the result
                future.set_exception(exc)

    threading.Thread(target=derive, name="raksha-kdf", daemon=True).start()


def _derive_argon2(secret: Secret, kdf: dict[str, Any]) -> bytes:
    assert secret.passphrase is not None
    with _ARGON2:
        return Argon2id(
            salt=base64.b64decode(kdf["salt"]),
            length=32,
            iterations=int(kdf["iterations"]),
            lanes=int(kdf["lanes"]),
            memory_cost=int(kdf["memory_kib"]),
        ).derive(secret.passphrase)


def _kek(secret: Secret, kdf: dict[str, Any]) -> bytes:
    if kdf["algorithm"] == "keyfile":
        assert secret.keyfile is not None
        return blake3.blake3(secret.keyfile, derive_key_context=KEYFILE_CONTEXT).digest()
    if kdf["algorithm"] == "argon2id":
        assert secret.passphrase is not None
        with _prefetched_lock:
            future = _prefetched.pop(_argon2_key(secret.passphrase, kdf), None)
        return future.result() if future is not None else _derive_argon2(secret, kdf)
    raise VaultCorrupt(f"unknown key derivation {kdf['algorithm']!r}")


def wrap_master_key(master: MasterKey, secret: Secret, vault_id: str, params: KdfParams | None = None) -> bytes:
    """A new key file object (JSON bytes) holding ``master`` wrapped by ``secret``."""
    key_id = os.urandom(16).hex()
    if secret.keyfile is not None:
        kdf: dict[str, Any] = {"algorithm": "keyfile"}
    else:
        p = params or KdfParams()
        kdf = {
            "algorithm": "argon2id",
            "salt": base64.b64encode(os.urandom(16)).decode(),
            "memory_kib": p.memory_kib,
            "iterations": p.iterations,
            "lanes": p.lanes,
        }
    nonce = os.urandom(NONCE_SIZE)
    wrapped = nonce + AESGCM(_kek(secret, kdf)).encrypt(nonce, master.to_bytes(), _aad(vault_id))
    doc = {
        "version": 1,
        "id": key_id,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": socket.gethostname(),
        "kdf": kdf,
        "wrapped": base64.b64encode(wrapped).decode(),
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def key_file_id(data: bytes) -> str:
    return str(json.loads(data)["id"])


def unwrap_master_key(data: bytes, secret: Secret, vault_id: str) -> MasterKey | None:
    """The master key if ``secret`` opens this key file; None if it does not fit."""
    try:
        doc = json.loads(data)
        kdf = doc["kdf"]
        wrapped = base64.b64decode(doc["wrapped"])
    except (ValueError, KeyError, TypeError) as exc:
        raise VaultCorrupt(f"key file: malformed: {exc}") from None
    if (kdf.get("algorithm") == "keyfile") != (secret.keyfile is not None):
        return None
    try:
        raw = AESGCM(_kek(secret, kdf)).decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], _aad(vault_id))
    except InvalidTag:
        return None
    return MasterKey.from_bytes(raw)
