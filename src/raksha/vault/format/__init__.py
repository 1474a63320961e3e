"""The vault's on-disk format (docs/design/format.md): pure encode/decode, no I/O."""
