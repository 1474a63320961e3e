"""A CLI command opens an encrypted vault reading each key file once: its derivation starts from them."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pytest

from raksha.cli import vault_cmd
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


def test_the_memory_reserved_for_the_derivation_is_used_or_unmapped(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from raksha.vault.format import kdf

    Vault.init(LocalBackend(tmp_path / "enc", create=True), VaultConfig.new(encrypted=True),
               Secret(passphrase=b"pw"), kdf=KdfParams(memory_kib=8192, iterations=1, lanes=1))
    Vault.init(LocalBackend(tmp_path / "plain", create=True), VaultConfig.new())
    monkeypatch.setenv("RAKSHA_PASSWORD", "pw")
    reserved: list[int] = []
    real = kdf.reserve  # the default 64 MiB, as the key files here use 8 MiB
    monkeypatch.setattr(vault_cmd, "reserve", lambda memory_kib=65536: reserved.append(memory_kib) or real(8192))
    for name in ("enc", "plain"):  # derived in it; a vault with no key to derive
        VaultOpening(argparse.Namespace(dir=str(tmp_path / name), password_file=None, key_file=None)).open()
        for thread in list(kdf._reserving):
            thread.join()
        assert not kdf._reserved, name
    assert reserved == [65536, 65536]
