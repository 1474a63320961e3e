"""Chunk ids and the sealing of bytes: plaintext and encrypted vaults behind one interface."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from raksha.domain.errors import VaultCorrupt
from raksha.vault.format.constants import NONCE_SIZE, TAG_SIZE


@dataclass(frozen=True)
class MasterKey:
    encryption_key: bytes
    chunk_id_key: bytes

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(os.urandom(32), os.urandom(32))

    @classmethod
    def from_bytes(cls, raw: bytes) -> MasterKey:
        if len(raw) != 64:
            raise ValueError("a master key is 64 bytes")
        return cls(raw[:32], raw[32:])

    def to_bytes(self) -> bytes:
        return self.encryption_key + self.chunk_id_key


class Crypto:
    """Plaintext vault: ids are BLAKE3 and sealing is the identity."""

    encrypted = False

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data).digest()

    def seal(self, data: bytes, aad: bytes) -> bytes:
        return data

    def open(self, data: bytes, aad: bytes, *, what: str) -> bytes:
        return data

    def seal_into(self, data: memoryview, aad: bytes, out: bytearray | mmap.mmap) -> memoryview:
        """``seal`` into the reused buffer ``out`` (at least ``sealed_size(len(data))`` bytes); a view of it."""
        n = len(data)
        view = memoryview(out)
        view[:n] = data
        return view[:n]

    def open_into(
        self, data: bytes | bytearray | memoryview, aad: bytes, out: bytearray | mmap.mmap, *, what: str
    ) -> memoryview:
        """``open`` into the reused buffer ``out``; a view of it."""
        n = len(data)
        view = memoryview(out)
        view[:n] = data
        return view[:n]

    def sealed_size(self, n: int) -> int:
        return n

    def sealer(self, aad: bytes) -> Stream:
        """``seal`` a piece at a time: the nonce from ``head``, then ``update`` each piece, then ``finish``
        (the tag). The bytes are those ``seal`` gives for the pieces joined."""
        raise NotImplementedError("a plaintext vault seals nothing")

    def opener(self, nonce: bytes, aad: bytes, *, what: str = "") -> Stream:
        """``open`` a piece at a time; ``finish(tag)`` raises VAULT_CORRUPT if anything was not authentic,
        so nothing read may be trusted before it returns."""
        raise NotImplementedError("a plaintext vault seals nothing")


class Stream:
    """AES-256-GCM over pieces (see ``Crypto.sealer`` and ``Crypto.opener``)."""

    def __init__(self, context: Any, nonce: bytes, what: str) -> None:
        self._context = context
        self.head = nonce
        self._what = what

    def update(self, data: bytes | memoryview) -> bytes:
        return bytes(self._context.update(data))

    def finish(self, tag: bytes | None = None) -> bytes:
        """Sealing: the last bytes and the tag. Opening: check ``tag``; the last bytes."""
        if tag is None:
            return bytes(self._context.finalize()) + bytes(self._context.tag)
        try:
            return bytes(self._context.finalize_with_tag(tag))
        except (InvalidTag, ValueError):
            raise VaultCorrupt(f"{self._what}: authentication failed (damaged or tampered)",
                               object=self._what) from None


class EncryptedCrypto(Crypto):
    """AES-256-GCM with random nonces; ids are BLAKE3 keyed with a secret so they leak nothing."""

    encrypted = True

    def __init__(self, key: MasterKey) -> None:
        self._key = key.encryption_key
        self._aead = AESGCM(key.encryption_key)
        self._id_key = key.chunk_id_key

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self._id_key).digest()

    def seal(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def open(self, data: bytes, aad: bytes, *, what: str) -> bytes:
        if len(data) < NONCE_SIZE + TAG_SIZE:
            raise VaultCorrupt(f"{what}: truncated ciphertext ({len(data)} bytes)", object=what)
        try:
            return self._aead.decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], aad)
        except InvalidTag:
            raise VaultCorrupt(f"{what}: authentication failed (damaged or tampered)", object=what) from None

    def seal_into(self, data: memoryview, aad: bytes, out: bytearray | mmap.mmap) -> memoryview:
        nonce = os.urandom(NONCE_SIZE)
        size = NONCE_SIZE + len(data) + TAG_SIZE
        view = memoryview(out)
        view[:NONCE_SIZE] = nonce
        self._aead.encrypt_into(nonce, data, aad, view[NONCE_SIZE:size])
        return view[:size]

    def open_into(
        self, data: bytes | bytearray | memoryview, aad: bytes, out: bytearray | mmap.mmap, *, what: str
    ) -> memoryview:
        if len(data) < NONCE_SIZE + TAG_SIZE:
            raise VaultCorrupt(f"{what}: truncated ciphertext ({len(data)} bytes)", object=what)
        view, src = memoryview(out), memoryview(data)
        n = len(src) - NONCE_SIZE - TAG_SIZE
        try:
            self._aead.decrypt_into(bytes(src[:NONCE_SIZE]), src[NONCE_SIZE:], aad, view[:n])
        except InvalidTag:
            raise VaultCorrupt(f"{what}: authentication failed (damaged or tampered)", object=what) from None
        return view[:n]

    def sealed_size(self, n: int) -> int:
        return NONCE_SIZE + n + TAG_SIZE

    def sealer(self, aad: bytes) -> Stream:
        nonce = os.urandom(NONCE_SIZE)
        context = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).encryptor()
        context.authenticate_additional_data(aad)
        return Stream(context, nonce, "")

    def opener(self, nonce: bytes, aad: bytes, *, what: str = "") -> Stream:
        context = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).decryptor()
        context.authenticate_additional_data(aad)
        return Stream(context, nonce, what)
