"""Where disk bytes come from (backup) and go to (restore): raw files, block devices, NBD exports."""

from raksha.vault.sources.base import DiskSource, DiskTarget, Extent
from raksha.vault.sources.open import create_target, open_source

__all__ = ["DiskSource", "DiskTarget", "Extent", "create_target", "open_source"]
