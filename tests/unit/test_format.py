"""The vault format (docs/design/format.md) as pure encode/decode: every object round-trips, and
every damage a storage can do to it (one flipped bit, a cut-off tail) is detected as
VAULT_CORRUPT rather than misread. Each test runs for a plaintext and an encrypted vault."""

from __future__ import annotations

import base64
import json
import os
import struct
import threading
from collections.abc import Callable

import blake3
import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from raksha.domain.errors import InvalidInput, VaultCorrupt, VaultFormatUnsupported
from raksha.vault.format import sealed
from raksha.vault.format.blob import BlobDecoder, BlobEncoder, decode_blob, encode_blob, looks_incompressible
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.constants import (
    BACKUP_MAGIC,
    BLOB_RAW,
    BLOB_ZSTD,
    INDEX_MAGIC,
    KEYFILE_CONTEXT,
    METADATA_MAGIC,
    NONCE_SIZE,
    PACK_HEADER_MAGIC,
    ZERO_ID,
)
from raksha.vault.format.crypto import Crypto, EncryptedCrypto, MasterKey
from raksha.vault.format.index import Location, decode_index, encode_index
from raksha.vault.format.keys import KdfParams, Secret, unwrap_master_key, wrap_master_key
from raksha.vault.format.manifest import (
    Manifest,
    decode_manifest,
    decode_metadata,
    encode_manifest,
    encode_metadata,
)
from raksha.vault.format.naming import BackupId
from raksha.vault.format.pack import (
    PackEntry,
    decode_pack_header,
    encode_pack_trailer,
    new_pack_preamble,
)
from raksha.vault.format.sealed import open_object, open_stream, seal_object, seal_stream

FAST_KDF = KdfParams(memory_kib=8192, iterations=1, lanes=1)
PACK_MAGIC_VERSION = b"RKPK\x01\x00\x00\x00"  # format.md §6: magic, version 1, three zero bytes; then a nonce
NONCE = 16  # the random nonce after a pack's preamble and at the start of an index payload (§6, §7)
VERSION_BYTE = 4  # magic(4) | version(1) | flags(1) | body


@pytest.fixture(params=["plaintext", "encrypted"])
def crypto(request: pytest.FixtureRequest) -> Crypto:
    return Crypto() if request.param == "plaintext" else EncryptedCrypto(MasterKey.generate())


def flip(data: bytes, byte: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[byte] ^= 1 << bit
    return bytes(out)


def every_flip(data: bytes) -> list[tuple[int, bytes]]:
    """(position, data with one bit flipped there) for every byte; the bit rotates with the position."""
    return [(i, flip(data, i, i % 8)) for i in range(len(data))]


def assert_all_damage_detected(data: bytes, decode: Callable[[bytes], object], *, version_at: int | None) -> None:
    """Every one-bit flip and every truncation of ``data`` makes ``decode`` raise VaultCorrupt.

    A flip of the object version byte is an unknown version instead: VAULT_FORMAT_UNSUPPORTED.
    """
    for pos, damaged in every_flip(data):
        expected = VaultFormatUnsupported if pos == version_at else VaultCorrupt
        with pytest.raises(expected) as caught:
            decode(damaged)
        assert type(caught.value) is expected, f"flip at byte {pos}: {caught.value!r}"
    for length in range(len(data)):
        with pytest.raises(VaultCorrupt):
            decode(data[:length])


# -- sealed objects (§12) ---------------------------------------------------------------------------


def test_sealed_object_roundtrip_and_layout(crypto: Crypto) -> None:
    payload = b"a metadata payload " * 20
    sealed = seal_object(INDEX_MAGIC, payload, crypto)

    assert sealed[:4] == INDEX_MAGIC
    assert sealed[4] == 1  # object version
    assert sealed[5] == (1 if crypto.encrypted else 0)  # flags bit 0: encrypted
    assert open_object(sealed, INDEX_MAGIC, crypto, what="x") == payload
    if crypto.encrypted:
        assert payload[:20] not in sealed
    else:  # body = zstd(payload) | BLAKE3(zstd(payload))
        compressed = sealed[6:-32]
        assert sealed[-32:] == blake3.blake3(compressed).digest()
        assert zstandard.ZstdDecompressor().decompress(compressed) == payload


def test_sealed_object_detects_every_flip_and_truncation(crypto: Crypto) -> None:
    sealed = seal_object(BACKUP_MAGIC, b"payload that matters" * 3, crypto, aad=b"backupjobs/a/b/c/d/Backup")
    assert_all_damage_detected(
        sealed, lambda d: open_object(d, BACKUP_MAGIC, crypto, what="obj", aad=b"backupjobs/a/b/c/d/Backup"),
        version_at=VERSION_BYTE)


def _open_streamed(data: bytes, crypto: Crypto, *, first: int = 64, aad: bytes = b"") -> bytes:
    """``data`` opened as a large object is: its first bytes, then ranged reads of the rest."""
    def read_range(offset: int, n: int) -> bytes:
        return data[offset : offset + n]

    return open_stream(read_range, len(data), data[:first], BACKUP_MAGIC, crypto, what="obj", aad=aad).read_all()


def test_a_streamed_seal_is_the_same_object(crypto: Crypto, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sealed a piece at a time and opened a piece at a time (pieces of 7 bytes here): the same bytes as
    sealed whole, and opened whole too."""
    monkeypatch.setattr(sealed, "STREAM_PIECE", 7)
    parts = [b"head", os.urandom(3000), b"", b"tail" * 100]
    out: list[bytes] = []
    seal_stream(BACKUP_MAGIC, parts, sum(map(len, parts)), crypto, out.append, aad=b"k")
    streamed = b"".join(out)
    assert open_object(streamed, BACKUP_MAGIC, crypto, what="x", aad=b"k") == b"".join(parts)
    assert _open_streamed(streamed, crypto, aad=b"k") == b"".join(parts)
    whole = seal_object(BACKUP_MAGIC, parts, crypto, aad=b"k")
    if not crypto.encrypted:
        assert whole == streamed  # encrypted ones differ in their random nonce only
    assert _open_streamed(whole, crypto, first=10, aad=b"k") == b"".join(parts)


def test_a_streamed_open_detects_every_flip_and_truncation(crypto: Crypto, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its tag or checksum is at the end: damage anywhere is found once the last piece is read."""
    monkeypatch.setattr(sealed, "STREAM_PIECE", 5)
    data = seal_object(BACKUP_MAGIC, os.urandom(40) + b"payload that matters" * 3, crypto, aad=b"k")
    assert_all_damage_detected(data, lambda d: _open_streamed(d, crypto, first=20, aad=b"k"),
                               version_at=VERSION_BYTE)


def test_a_streamed_object_is_unchecked_until_finished(crypto: Crypto) -> None:
    data = bytearray(seal_object(BACKUP_MAGIC, os.urandom(5000), crypto))
    data[-1] ^= 1  # the tag or checksum
    payload = open_stream(lambda o, n: bytes(data[o : o + n]), len(data), bytes(data[:64]), BACKUP_MAGIC, crypto,
                          what="obj")
    payload.read(payload.remaining)  # decompresses: the damage is in the trailer
    with pytest.raises(VaultCorrupt, match=r"authentication failed|checksum mismatch"):
        payload.finish()


@pytest.mark.parametrize("version", [0, 2, 255])
def test_sealed_object_of_unknown_version_is_unsupported(crypto: Crypto, version: int) -> None:
    sealed = bytearray(seal_object(INDEX_MAGIC, b"x", crypto))
    sealed[VERSION_BYTE] = version
    with pytest.raises(VaultFormatUnsupported) as caught:
        open_object(bytes(sealed), INDEX_MAGIC, crypto, what="index/abc")
    assert caught.value.code == "VAULT_FORMAT_UNSUPPORTED"
    assert "index/abc" in caught.value.message


def test_sealed_object_with_unknown_flags_is_rejected(crypto: Crypto) -> None:
    """Version 1 defines flag bit 0 only; an object with other bits set is not a version 1 object."""
    sealed = bytearray(seal_object(INDEX_MAGIC, b"x", crypto))
    sealed[5] |= 0x80
    with pytest.raises(VaultCorrupt):
        open_object(bytes(sealed), INDEX_MAGIC, crypto, what="index/abc")


def test_sealed_object_checks_magic_and_encryption_flag(crypto: Crypto) -> None:
    sealed = seal_object(INDEX_MAGIC, b"x", crypto)
    with pytest.raises(VaultCorrupt, match="RKBK"):
        open_object(sealed, BACKUP_MAGIC, crypto, what="x")
    other = Crypto() if crypto.encrypted else EncryptedCrypto(MasterKey.generate())
    with pytest.raises(VaultCorrupt):
        open_object(sealed, INDEX_MAGIC, other, what="x")


def test_encrypted_object_needs_the_right_key_and_aad() -> None:
    crypto = EncryptedCrypto(MasterKey.generate())
    sealed = seal_object(METADATA_MAGIC, b"secret", crypto, aad=b"key-1")
    with pytest.raises(VaultCorrupt):
        open_object(sealed, METADATA_MAGIC, EncryptedCrypto(MasterKey.generate()), what="x", aad=b"key-1")
    with pytest.raises(VaultCorrupt):
        open_object(sealed, METADATA_MAGIC, crypto, what="x", aad=b"key-2")
    assert open_object(sealed, METADATA_MAGIC, crypto, what="x", aad=b"key-1") == b"secret"


# -- chunk ids and blobs (§5) -----------------------------------------------------------------------


def test_chunk_ids_plaintext_is_blake3_and_encrypted_is_keyed() -> None:
    data = b"the same chunk" * 1000
    master = MasterKey.generate()
    plain, keyed = Crypto().chunk_id(data), EncryptedCrypto(master).chunk_id(data)

    assert plain == blake3.blake3(data).digest()
    assert keyed == blake3.blake3(data, key=master.chunk_id_key).digest()
    assert plain != keyed
    assert keyed != EncryptedCrypto(MasterKey.generate()).chunk_id(data)  # ids reveal nothing across vaults
    assert keyed == EncryptedCrypto(master).chunk_id(data)  # but are stable within one
    assert len(plain) == len(keyed) == 32 and bytes(32) == ZERO_ID


def _blob_roundtrip(crypto: Crypto, data: bytes) -> tuple[bytes, bytes]:
    cid = crypto.chunk_id(data)
    blob = encode_blob(data, cid, crypto, zstandard.ZstdCompressor(level=1))
    decoded = decode_blob(blob, cid, len(data), crypto, zstandard.ZstdDecompressor(), what="t")
    assert decoded == data
    return cid, blob


def test_blob_compresses_only_when_it_pays(crypto: Crypto) -> None:
    text = b"compressible line of a log file\n" * 2048
    noise = os.urandom(64 << 10)
    _, text_blob = _blob_roundtrip(crypto, text)
    _, noise_blob = _blob_roundtrip(crypto, noise)

    assert len(text_blob) < len(text) // 10
    overhead = NONCE_SIZE + 16 if crypto.encrypted else 0
    assert len(noise_blob) == 1 + len(noise) + overhead  # type byte + raw bytes (+ nonce and tag)
    if not crypto.encrypted:
        assert text_blob[0] == BLOB_ZSTD and noise_blob[0] == BLOB_RAW
        assert noise_blob[1:] == noise


@pytest.mark.parametrize("kind", ["compressed", "raw"])
def test_blob_detects_every_flip_and_truncation(crypto: Crypto, kind: str) -> None:
    data = (b"abcdefgh" * 512) if kind == "compressed" else os.urandom(4096)
    cid, blob = _blob_roundtrip(crypto, data)
    dec = zstandard.ZstdDecompressor()
    assert_all_damage_detected(blob, lambda b: decode_blob(b, cid, len(data), crypto, dec, what="t"),
                               version_at=None)


def test_blob_is_bound_to_its_chunk_id(crypto: Crypto) -> None:
    a, b = b"A" * 5000, b"B" * 5000
    cid_a, blob_a = _blob_roundtrip(crypto, a)
    cid_b, _ = _blob_roundtrip(crypto, b)
    with pytest.raises(VaultCorrupt):  # a blob served for another id is never accepted
        decode_blob(blob_a, cid_b, len(b), crypto, zstandard.ZstdDecompressor(), what="t")
    with pytest.raises(VaultCorrupt):  # nor with a wrong length
        decode_blob(blob_a, cid_a, len(a) - 1, crypto, zstandard.ZstdDecompressor(), what="t")


def _text(n: int) -> bytes:
    return (b"Nov 25 20:16:12 vm-07 sshd[4242]: Accepted publickey for ubuntu from 10.0.0.7\n" * (n // 70 + 1))[:n]


# Chunks the engine's reusing encoder meets: compressible, incompressible (1 MiB and 64 KiB, the
# smallest chunk size), half and half (the probe must not call it incompressible), a short tail.
MIXED_CHUNKS = {
    "text-1MiB": _text(1 << 20),
    "random-1MiB": os.urandom(1 << 20),
    "random-64KiB": os.urandom(64 << 10),
    "random-then-text": os.urandom(512 << 10) + _text(512 << 10),
    "text-with-random-quarters": b"".join(os.urandom(128 << 10) + _text(128 << 10) for _ in range(4)),
    "short-tail": _text(5000),
}


@pytest.mark.parametrize("name", sorted(MIXED_CHUNKS))
def test_reusing_encoder_and_decoder_match_the_plain_functions(crypto: Crypto, name: str) -> None:
    data = MIXED_CHUNKS[name]
    cid = crypto.chunk_id(data)
    encoder, decoder = BlobEncoder(crypto, 1, 1 << 20), BlobDecoder(crypto, 1 << 20)
    blob = bytes(encoder.encode(data, cid))
    blob_again = bytes(encoder.encode(data, cid))  # the buffers are reused: the first view is stale now
    plain = encode_blob(data, cid, crypto, zstandard.ZstdCompressor(level=1))
    out = memoryview(bytearray(1 << 20))
    for b in (blob, blob_again, plain):
        assert decode_blob(b, cid, len(data), crypto, zstandard.ZstdDecompressor(), what="t") == data
        assert decoder.decode_into(b, cid, len(data), out, what="t") == data
    if not crypto.encrypted:
        assert blob == blob_again
        # Stored raw only when compressing does not pay (or the probe says so for a random chunk).
        expect_raw = name in ("random-1MiB", "random-64KiB")
        assert blob[0] == (BLOB_RAW if expect_raw else BLOB_ZSTD)
        assert plain[0] == blob[0]
    assert len(blob) <= len(plain) + (1 << 10)  # the probe never costs more than noise in size


def test_probe_skips_compressing_only_incompressible_chunks() -> None:
    comp = zstandard.ZstdCompressor(level=1)
    assert looks_incompressible(MIXED_CHUNKS["random-1MiB"], comp)
    # Small data is compressed whole (zstd gives it up as fast as the probe would): stored raw all the same.
    assert not looks_incompressible(MIXED_CHUNKS["random-64KiB"], comp)
    assert not looks_incompressible(MIXED_CHUNKS["random-1MiB"][: 127 << 10], comp)
    assert looks_incompressible(MIXED_CHUNKS["random-1MiB"][: 128 << 10], comp)
    for name in ("text-1MiB", "random-then-text", "text-with-random-quarters", "short-tail"):
        assert not looks_incompressible(MIXED_CHUNKS[name], comp), name
    assert not looks_incompressible(bytes(1 << 20), comp)
    encoder = BlobEncoder(Crypto(), 1, 1 << 20)
    raw = encoder.encode(MIXED_CHUNKS["random-1MiB"], b"\x01" * 32)
    assert raw[0] == BLOB_RAW and raw[1:] == MIXED_CHUNKS["random-1MiB"]
    assert encoder.probe_skipped == 1 and encoder.stored_raw == 1
    unprobed = BlobEncoder(Crypto(), 1, 1 << 20, probe=False)
    assert unprobed.encode(MIXED_CHUNKS["random-1MiB"], b"\x01" * 32) == raw  # zstd gives up the same way
    assert unprobed.probe_skipped == 0 and unprobed.stored_raw == 1


@pytest.mark.parametrize("kind", ["compressed", "raw"])
def test_reusing_decoder_detects_every_flip_and_truncation(crypto: Crypto, kind: str) -> None:
    data = (b"abcdefgh" * 512) if kind == "compressed" else os.urandom(4096)
    cid = crypto.chunk_id(data)
    blob = bytes(BlobEncoder(crypto, 1, 1 << 16).encode(data, cid))
    decoder, out = BlobDecoder(crypto, 1 << 16), memoryview(bytearray(1 << 16))
    assert_all_damage_detected(blob, lambda b: decoder.decode_into(b, cid, len(data), out, what="t"),
                               version_at=None)
    other = b"B" * len(data)
    with pytest.raises(VaultCorrupt):  # bound to its id
        decoder.decode_into(blob, crypto.chunk_id(other), len(data), out, what="t")
    with pytest.raises(VaultCorrupt):  # and to its length
        decoder.decode_into(blob, cid, len(data) - 1, out, what="t")
    if kind == "raw":
        with pytest.raises(VaultCorrupt):  # a blob longer than any chunk of the vault
            BlobDecoder(crypto, 1024).decode_into(blob, cid, len(data), out, what="t")


# -- packs (§6) -------------------------------------------------------------------------------------


def _pack(crypto: Crypto, chunks: list[bytes]) -> tuple[bytes, list[PackEntry]]:
    comp = zstandard.ZstdCompressor(level=1)
    body, entries = bytearray(new_pack_preamble()), []
    for data in chunks:
        cid = crypto.chunk_id(data)
        blob = encode_blob(data, cid, crypto, comp)
        entries.append(PackEntry(cid, len(body), len(blob), len(data)))
        body += blob
    return bytes(body) + encode_pack_trailer(entries, crypto), entries


def test_pack_roundtrip_and_layout(crypto: Crypto) -> None:
    chunks = [b"first chunk " * 300, os.urandom(3000), b"third" * 700]
    pack, entries = _pack(crypto, chunks)

    assert pack[:8] == PACK_MAGIC_VERSION
    assert entries[0].offset == 8 + NONCE  # the first blob follows the nonce
    assert _pack(crypto, chunks)[0][8 : 8 + NONCE] != pack[8 : 8 + NONCE]  # same chunks, another pack name
    (header_len,) = struct.unpack("<I", pack[-4:])
    assert pack[-4 - header_len : -4][:4] == PACK_HEADER_MAGIC
    assert decode_pack_header(pack, crypto, what="p") == entries
    dec = zstandard.ZstdDecompressor()
    for e, data in zip(entries, chunks, strict=True):
        blob = pack[e.offset : e.offset + e.stored_length]
        assert decode_blob(blob, e.chunk_id, e.raw_length, crypto, dec, what="p") == data


def test_pack_header_detects_every_flip_and_truncation(crypto: Crypto) -> None:
    pack, _ = _pack(crypto, [b"chunk one " * 100, b"chunk two " * 100])
    (header_len,) = struct.unpack("<I", pack[-4:])
    trailer_at = len(pack) - 4 - header_len

    def decode(damaged: bytes) -> object:
        return decode_pack_header(damaged, crypto, what="data/ab/abcd")

    # The magic, the pack version and every byte of the header and its length are checked;
    # blobs are checked by their ids (and the pack by its name), not by the header.
    for pos in [*range(5), *range(trailer_at, len(pack))]:
        damaged = flip(pack, pos, pos % 8)
        expected = VaultFormatUnsupported if pos in (4, trailer_at + VERSION_BYTE) else VaultCorrupt
        with pytest.raises(expected) as caught:
            decode(damaged)
        assert type(caught.value) is expected, f"flip at byte {pos}: {caught.value!r}"
    for length in range(len(pack)):
        with pytest.raises(VaultCorrupt):
            decode(pack[:length])


def test_pack_header_entries_must_lie_inside_the_pack(crypto: Crypto) -> None:
    pack, entries = _pack(crypto, [b"x" * 1000])
    body = pack[: entries[0].offset + entries[0].stored_length]
    for bad in (PackEntry(entries[0].chunk_id, 2, 10, 10),  # inside the preamble
                PackEntry(entries[0].chunk_id, entries[0].offset, len(body), 1000)):  # past the blobs
        with pytest.raises(VaultCorrupt, match="outside"):
            decode_pack_header(body + encode_pack_trailer([bad], crypto), crypto, what="p")


# -- indexes (§7) -----------------------------------------------------------------------------------


def _locations(n: int) -> dict[bytes, Location]:
    return {blake3.blake3(bytes([i])).digest(): Location(blake3.blake3(b"pack").digest(), 8 + 100 * i, 90, 4096)
            for i in range(n)}


def test_index_roundtrip_with_supersedes(crypto: Crypto) -> None:
    entries = _locations(5)
    supersedes = [blake3.blake3(b"old index 1").digest(), blake3.blake3(b"old index 2").digest()]
    decoded = decode_index(encode_index(entries, crypto, supersedes), crypto, what="index/x")
    assert decoded.entries == entries
    assert decoded.supersedes == supersedes
    empty = decode_index(encode_index({}, crypto), crypto, what="index/y")
    assert empty.entries == {} and empty.supersedes == []
    # the payload's nonce: the same entries never make the same object, so an index id is never reused
    assert encode_index(entries, crypto) != encode_index(entries, crypto)


def test_index_payload_layout() -> None:
    """§7 byte for byte (plaintext): nonce | n_supersedes | ids | count | entries."""
    loc = Location(bytes(range(32)), 24, 100, 4096)
    cid, old = b"\xcc" * 32, b"\xee" * 32
    sealed = encode_index({cid: loc}, Crypto(), [old])
    payload = zstandard.ZstdDecompressor().decompress(sealed[6:-32])
    assert len(payload) == NONCE + 4 + 32 + 4 + 76
    assert payload[NONCE:] == (struct.pack("<I", 1) + old + struct.pack("<I", 1) + cid + loc.pack_id
                               + struct.pack("<III", 24, 100, 4096))


def test_index_detects_every_flip_and_truncation(crypto: Crypto) -> None:
    data = encode_index(_locations(3), crypto, [blake3.blake3(b"old").digest()])
    assert_all_damage_detected(data, lambda d: decode_index(d, crypto, what="index/x"), version_at=VERSION_BYTE)


def test_index_whose_count_does_not_match_is_corrupt(crypto: Crypto) -> None:
    payload = os.urandom(NONCE) + struct.pack("<II", 0, 2) + b"\x00" * 76  # claims two entries, holds one
    with pytest.raises(VaultCorrupt, match="count"):
        decode_index(seal_object(INDEX_MAGIC, payload, crypto), crypto, what="index/x")
    huge = os.urandom(NONCE) + struct.pack("<I", 0xFFFFFFFF) + b"\x00" * 40  # must fail, not allocate 128 GiB
    with pytest.raises(VaultCorrupt):
        decode_index(seal_object(INDEX_MAGIC, huge, crypto), crypto, what="index/x")


# -- Backup manifests and BackupMetadata (§8, §9) -----------------------------------------------------

BID = BackupId.parse("job1/run1/vm1/vda")
OTHER = BackupId.parse("job1/run2/vm1/vda")


def _manifest(crypto: Crypto, backup_id: BackupId = BID) -> Manifest:
    chunk_size = 64 << 10
    ids = [crypto.chunk_id(bytes([i]) * 10) for i in range(4)]
    ids[2] = ZERO_ID
    return Manifest(backup_id, 3 * chunk_size + 512, chunk_size, ids, "raw", "2026-11-25T17:00:00.000000Z",
                    parent="job1/run0/vm1/vda")


def test_manifest_roundtrip(crypto: Crypto) -> None:
    m = _manifest(crypto)
    data = encode_manifest(m, crypto)
    back = decode_manifest(data, BID, crypto)

    assert back == m
    assert back.chunk_count == 4 and back.chunk_length(3) == 512 and back.chunk_length(0) == 64 << 10
    # content_digest = BLAKE3(u64le(V) | u64le(C) | ids), the same for the same content
    expected = blake3.blake3(struct.pack("<QQ", m.virtual_size, m.chunk_size) + b"".join(m.chunk_ids))
    assert m.content_digest() == expected.hexdigest()
    if not crypto.encrypted:
        payload = zstandard.ZstdDecompressor().decompress(data[6:-32])
        (head_len,) = struct.unpack_from("<I", payload)
        head = json.loads(payload[4 : 4 + head_len])
        assert head["id"] == str(BID) and head["chunk_count"] == 4 and head["version"] == 1
        assert head["content_digest"] == m.content_digest()
        assert payload[4 + head_len :] == b"".join(m.chunk_ids)


def test_manifest_detects_every_flip_and_truncation(crypto: Crypto) -> None:
    data = encode_manifest(_manifest(crypto), crypto)
    assert_all_damage_detected(data, lambda d: decode_manifest(d, BID, crypto), version_at=VERSION_BYTE)


def test_manifest_cannot_be_moved_to_another_backup_id(crypto: Crypto) -> None:
    """Encrypted: the aad is the object's key; plaintext: the head names its id."""
    data = encode_manifest(_manifest(crypto), crypto)
    with pytest.raises(VaultCorrupt) as caught:
        decode_manifest(data, OTHER, crypto)
    assert str(OTHER) in caught.value.message


def test_encrypted_manifest_moved_with_a_forged_head_still_fails() -> None:
    """Even a manifest whose head names the other id does not open under that id's key: aad binding."""
    crypto = EncryptedCrypto(MasterKey.generate())
    forged = _manifest(crypto, OTHER)  # head says OTHER, sealed with OTHER's key as aad
    data = encode_manifest(forged, crypto)
    assert decode_manifest(data, OTHER, crypto).id == OTHER
    with pytest.raises(VaultCorrupt, match="authentication failed"):
        decode_manifest(data, BID, crypto)


def _sealed_manifest_with_head(crypto: Crypto, **changes: object) -> bytes:
    m = _manifest(crypto)
    head = {"version": 1, "id": str(BID), "virtual_size": m.virtual_size, "chunk_size": m.chunk_size,
            "chunk_count": m.chunk_count, "source_format": "raw", "parent": None, "created": m.created,
            "content_digest": m.content_digest(), **changes}
    raw = json.dumps(head).encode()
    payload = struct.pack("<I", len(raw)) + raw + b"".join(m.chunk_ids)
    return seal_object(BACKUP_MAGIC, payload, crypto, aad=BID.backup_key.encode())


def test_manifest_head_of_unknown_version_is_unsupported(crypto: Crypto) -> None:
    assert decode_manifest(_sealed_manifest_with_head(crypto), BID, crypto).virtual_size > 0
    with pytest.raises(VaultFormatUnsupported):
        decode_manifest(_sealed_manifest_with_head(crypto, version=3), BID, crypto)


@pytest.mark.parametrize("changes", [{"content_digest": "00" * 32}, {"virtual_size": 1 << 30}, {"id": "a/b/c/d"},
                                     {"chunk_size": "big"}])
def test_manifest_head_inconsistent_with_its_ids_is_corrupt(crypto: Crypto, changes: dict[str, object]) -> None:
    with pytest.raises(VaultCorrupt):
        decode_manifest(_sealed_manifest_with_head(crypto, **changes), BID, crypto)


def test_metadata_roundtrip_and_damage(crypto: Crypto) -> None:
    meta = {"kind": "full", "stats": {"bytes_read": 123}, "hints": {"owner": "tenant-a"}}
    data = encode_metadata(BID, meta, crypto)
    assert decode_metadata(data, BID, crypto) == {"version": 1, "id": str(BID), **meta}
    assert_all_damage_detected(data, lambda d: decode_metadata(d, BID, crypto), version_at=VERSION_BYTE)


def test_encrypted_metadata_is_bound_to_its_backup_id() -> None:
    crypto = EncryptedCrypto(MasterKey.generate())
    data = encode_metadata(BID, {"kind": "full"}, crypto)
    with pytest.raises(VaultCorrupt, match="authentication failed"):
        decode_metadata(data, OTHER, crypto)


# -- config (§3) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [False, True])
def test_config_roundtrip(encrypted: bool) -> None:
    config = VaultConfig.new(chunk_size=64 << 10, pack_size=1 << 20, compression_level=3, encrypted=encrypted)
    doc = json.loads(config.to_json())
    assert doc["format"] == "raksha-vault" and doc["version"] == 1
    assert doc["compression"] == {"algorithm": "zstd", "level": 3}
    assert doc["encryption"] == ({"algorithm": "aes-256-gcm", "chunk_id": "blake3-keyed"} if encrypted else None)
    assert VaultConfig.from_json(config.to_json()) == config


def test_config_readers_ignore_unknown_members() -> None:
    doc = json.loads(VaultConfig.new().to_json())
    doc["added_later"] = {"anything": 1}
    assert VaultConfig.from_json(json.dumps(doc).encode()).chunk_size == 1 << 20


@pytest.mark.parametrize("version", [0, 2, "1"])
def test_config_of_unknown_version_is_unsupported(version: object) -> None:
    doc = json.loads(VaultConfig.new().to_json())
    doc["version"] = version
    with pytest.raises(VaultFormatUnsupported) as caught:
        VaultConfig.from_json(json.dumps(doc).encode())
    assert caught.value.exit_status == 7


@pytest.mark.parametrize("change", [
    {"format": "borg"}, {"chunk_size": 0}, {"chunk_size": 1000}, {"chunk_size": 1 << 30}, {"chunk_size": "1M"},
    {"pack_size": 4096}, {"compression": None}, {"vault_id": None},
])
def test_config_with_bad_members_is_corrupt(change: dict[str, object]) -> None:
    doc = {k: v for k, v in json.loads(VaultConfig.new().to_json()).items()}
    doc.update(change)
    if doc["vault_id"] is None:
        del doc["vault_id"]
    with pytest.raises(VaultCorrupt):
        VaultConfig.from_json(json.dumps(doc).encode())


def test_config_truncated_or_not_json_is_corrupt() -> None:
    data = VaultConfig.new(encrypted=True).to_json()
    for length in range(len(data.rstrip())):
        with pytest.raises(VaultCorrupt):
            VaultConfig.from_json(data[:length])
    for junk in (b"\xff\xfe", b"[]", b"null", b"42"):
        with pytest.raises(VaultCorrupt):
            VaultConfig.from_json(junk)


# -- keys (§4) --------------------------------------------------------------------------------------

VAULT_ID = "0123456789abcdef0123456789abcdef"


def test_master_key_wrapped_by_a_passphrase() -> None:
    master = MasterKey.generate()
    doc = wrap_master_key(master, Secret(passphrase=b"hunter2"), VAULT_ID, FAST_KDF)

    parsed = json.loads(doc)
    assert parsed["kdf"]["algorithm"] == "argon2id" and parsed["kdf"]["memory_kib"] == 8192
    assert master.to_bytes() not in doc and master.encryption_key.hex() not in doc.decode()
    assert unwrap_master_key(doc, Secret(passphrase=b"hunter2"), VAULT_ID) == master
    assert unwrap_master_key(doc, Secret(passphrase=b"hunter3"), VAULT_ID) is None
    assert unwrap_master_key(doc, Secret(keyfile=os.urandom(32)), VAULT_ID) is None
    # bound to its vault: the same key file copied into another vault does not open
    assert unwrap_master_key(doc, Secret(passphrase=b"hunter2"), "f" * 32) is None


def test_passphrases_unwrap_in_several_threads_at_once() -> None:
    # Four lanes and three passes: two such derivations at once hang in the cryptography 50 wheels.
    doc = wrap_master_key(MasterKey.generate(), Secret(passphrase=b"pw"), VAULT_ID,
                          KdfParams(memory_kib=1024, iterations=3, lanes=4))
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(
        unwrap_master_key(doc, Secret(passphrase=b"pw"), VAULT_ID)), daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4 and all(r is not None for r in results)


def test_a_prefetched_derivation_is_taken_by_the_unwrap() -> None:
    from raksha.vault.format import kdf

    master = MasterKey.generate()
    right = wrap_master_key(master, Secret(passphrase=b"pw"), VAULT_ID, FAST_KDF)
    other = wrap_master_key(MasterKey.generate(), Secret(passphrase=b"other"), VAULT_ID, FAST_KDF)
    kdf.prefetch([b"{not json", other, right, wrap_master_key(master, Secret(keyfile=os.urandom(32)), VAULT_ID)],
                 Secret(passphrase=b"pw"))
    assert len(kdf._pending) == 2  # the two Argon2id key files; the malformed and key-file ones skipped
    assert unwrap_master_key(other, Secret(passphrase=b"pw"), VAULT_ID) is None  # prefetched, does not fit
    assert unwrap_master_key(right, Secret(passphrase=b"pw"), VAULT_ID) == master
    assert kdf._pending == {}  # each result taken once: no derived key lingers
    assert unwrap_master_key(right, Secret(passphrase=b"pw"), VAULT_ID) == master  # derived again


def test_a_prefetched_derivation_that_failed_raises_when_taken() -> None:
    from raksha.vault.format import kdf

    doc = json.loads(wrap_master_key(MasterKey.generate(), Secret(passphrase=b"pw"), VAULT_ID, FAST_KDF))
    doc["kdf"]["memory_kib"] = 1  # below Argon2's minimum of 8 KiB a lane
    broken = json.dumps(doc).encode()
    kdf.prefetch([broken], Secret(passphrase=b"pw"))
    with pytest.raises(VaultCorrupt, match="Argon2id parameters rejected"):
        unwrap_master_key(broken, Secret(passphrase=b"pw"), VAULT_ID)
    assert kdf._pending == {}


def test_argon2id_agrees_with_openssls() -> None:
    # Key files written before ADR 0016 were derived by cryptography (OpenSSL); libargon2 must give
    # the same keys. The golden vault checks one such file; this checks costs other than its own.
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    from raksha.vault.format.kdf import derive_argon2

    salt = os.urandom(16)
    for iterations, memory_kib, lanes in ((1, 8, 1), (2, 1024, 4), (3, 4096, 2)):
        ours = derive_argon2(b"password", {"salt": base64.b64encode(salt).decode(), "iterations": iterations,
                                           "memory_kib": memory_kib, "lanes": lanes})
        theirs = Argon2id(salt=salt, length=32, iterations=iterations, lanes=lanes,
                          memory_cost=memory_kib).derive(b"password")
        assert ours == theirs


def test_a_secrets_repr_shows_neither_passphrase_nor_key() -> None:
    assert "hunter2" not in repr(Secret(passphrase=b"hunter2"))
    assert repr(Secret(keyfile=b"k" * 32)) == "Secret(keyfile=...)"


def test_master_key_wrapped_by_a_key_file() -> None:
    master = MasterKey.generate()
    keyfile = os.urandom(64)
    doc = wrap_master_key(master, Secret(keyfile=keyfile), VAULT_ID)

    parsed = json.loads(doc)
    assert parsed["kdf"] == {"algorithm": "keyfile"}
    assert unwrap_master_key(doc, Secret(keyfile=keyfile), VAULT_ID) == master
    assert unwrap_master_key(doc, Secret(keyfile=keyfile[:-1] + b"x"), VAULT_ID) is None
    assert unwrap_master_key(doc, Secret(passphrase=b"anything"), VAULT_ID) is None
    # kek = BLAKE3.derive_key(context, file bytes): a reader can follow the spec alone
    wrapped = base64.b64decode(parsed["wrapped"])
    kek = blake3.blake3(keyfile, derive_key_context=KEYFILE_CONTEXT).digest()
    raw = AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], f"raksha-master-key:{VAULT_ID}".encode())
    assert raw == master.to_bytes()


def test_damaged_key_file_does_not_open() -> None:
    master = MasterKey.generate()
    keyfile = os.urandom(32)
    doc = json.loads(wrap_master_key(master, Secret(keyfile=keyfile), VAULT_ID))
    wrapped = bytearray(base64.b64decode(doc["wrapped"]))
    wrapped[20] ^= 1
    doc["wrapped"] = base64.b64encode(bytes(wrapped)).decode()
    assert unwrap_master_key(json.dumps(doc).encode(), Secret(keyfile=keyfile), VAULT_ID) is None
    with pytest.raises(VaultCorrupt):
        unwrap_master_key(b"{not json", Secret(keyfile=keyfile), VAULT_ID)


def test_secrets_must_not_be_empty() -> None:
    with pytest.raises(InvalidInput):
        Secret(passphrase=b"")
    with pytest.raises(InvalidInput):
        Secret(keyfile=b"short")
