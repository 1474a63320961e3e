"""Numbers and magic strings fixed by docs/design/format.md."""

from __future__ import annotations

FORMAT_NAME = "raksha-vault"
FORMAT_VERSION = 1
OBJECT_VERSION = 1

ID_SIZE = 32
ZERO_ID = bytes(ID_SIZE)  # manifest entry for an all-zero chunk, which is never stored

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 64 << 20
DEFAULT_PACK_SIZE = 32 << 20
DEFAULT_COMPRESSION_LEVEL = 1

PACK_MAGIC = b"RKPK"
PACK_HEADER_MAGIC = b"RKPH"
INDEX_MAGIC = b"RKIX"
BACKUP_MAGIC = b"RKBK"
METADATA_MAGIC = b"RKMD"

BLOB_RAW = 0x00
BLOB_ZSTD = 0x01

NONCE_SIZE = 12
TAG_SIZE = 16
FLAG_ENCRYPTED = 0x01

KEYFILE_CONTEXT = "raksha 2026 vault key-file v1"
KEYS_PREFIX = "keys/"  # where a vault keeps its key files (format.md §4)
