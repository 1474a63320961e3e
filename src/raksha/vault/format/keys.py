"""Key files: the master key wrapped by a passphrase (Argon2id) or a key file (format.md §4)."""

from __future__ import annotations

import base64
import json
import os
import socket
from datetime import UTC, datetime
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from raksha.domain.errors import VaultCorrupt
from raksha.vault.format.constants import KEYFILE_CONTEXT, KEYS_PREFIX, NONCE_SIZE
from raksha.vault.format.crypto import MasterKey
from raksha.vault.format.kdf import KdfParams, Secret, derive

__all__ = ["KEYS_PREFIX", "KdfParams", "Secret", "key_file_id", "unwrap_master_key", "wrap_master_key"]


def _aad(vault_id: str) -> bytes:
    return f"raksha-master-key:{vault_id}".encode()


def _kek(secret: Secret, kdf: dict[str, Any]) -> bytes:
    if kdf["algorithm"] == "keyfile":
        assert secret.keyfile is not None
        return blake3.blake3(secret.keyfile, derive_key_context=KEYFILE_CONTEXT).digest()
    if kdf["algorithm"] == "argon2id":
        assert secret.passphrase is not None
        return derive(secret.passphrase, kdf)
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
