"""The vault: a deduplicating, compressed, optionally encrypted chunk store for disk images.

The on-disk format is specified in docs/design/format.md.
"""
