"""A CLI command opens an encrypted vault reading each key file once: its derivation starts from them."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pytest

from raksha.cli.vault_cmd import VaultOpening
from raksha.vault import backends
from raksha.vault.backends.local import LocalBackend
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.kdf import KdfParams
from raksha.vault.format.keys import Secret
from raksha.vault.repository import Vault


class CountingBackend(LocalBackend):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets: Counter[str] = Counter()

    def get(self, key: str) -> bytes:
        self.gets[key] += 1
        return super().get(key)


def test_each_key_file_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cheap = KdfParams(memory_kib=8192, iterations=1, lanes=1)
    vault = Vault.init(LocalBackend(tmp_path / "v", create=True), VaultConfig.new(encrypted=True),
                       Secret(passphrase=b"first"), kdf=cheap)
    vault.add_key(Secret(passphrase=b"second"), cheap)
    backend = CountingBackend(tmp_path / "v")
    monkeypatch.setattr(backends, "open_backend", lambda _url: backend)
    monkeypatch.setenv("RAKSHA_PASSWORD", "second")
    args = argparse.Namespace(dir=str(tmp_path / "v"), password_file=None, key_file=None)
    opened = VaultOpening(args).open()
    assert opened.config.vault_id == vault.config.vault_id
    keys = {k: n for k, n in backend.gets.items() if k.startswith("keys/")}
    assert len(keys) == 2 and set(keys.values()) == {1}
