"""Storage backends: the small object-store protocol the vault is written against."""

from raksha.vault.backends.base import Backend, ObjectInfo, open_backend

__all__ = ["Backend", "ObjectInfo", "open_backend"]
