"""The benchmark's engine driver (bench/engine_driver.py): trials of one incremental from the same vault state."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from conftest import load_bench
from raksha.vault.backends.local import LocalBackend
from raksha.vault.format.keys import Secret
from raksha.vault.format.naming import BackupId
from raksha.vault.repository import Vault

MIB = 1 << 20

driver = load_bench("engine_driver")


def _run(*argv: str) -> dict[str, object]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert driver.main(list(argv)) == 0
    result: dict[str, object] = json.loads(out.getvalue())
    return result


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    monkeypatch.setenv("RAKSHA_PASSWORD", "bench")
    base, changed = tmp_path / "base.img", tmp_path / "changed.img"
    data = os.urandom(4 * MIB)
    base.write_bytes(data)
    changed.write_bytes(data[: MIB + 4096] + os.urandom(8192) + data[MIB + 12288 :])
    extents = tmp_path / "changed.json"
    extents.write_text(json.dumps([[MIB + 4096, 8192]]))
    return base, changed, extents


def test_trials_time_the_same_incremental_and_report_their_median(
    tmp_path: Path, images: tuple[Path, Path, Path]
) -> None:
    base, changed, extents = images
    vault = tmp_path / "vault"
    full = _run(str(vault), str(base), "--id", "j/full/vm/vda", "--init")
    assert full["seconds_trials"] == [full["seconds"]]

    incr = _run(str(vault), str(changed), "--id", "j/incr/vm/vda", "--parent", "j/full/vm/vda",
                "--changed-extents", str(extents), "--trials", "3")
    trials = incr["seconds_trials"]
    assert isinstance(trials, list) and len(trials) == 3
    assert incr["seconds"] == sorted(trials)[1]
    report = incr["report"]
    assert isinstance(report, dict) and report["bytes_read"] == 8192  # every trial read only the change

    # The last trial ran on the vault itself; the others' copies are gone.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("vault")) == ["vault"]
    opened = Vault.open(LocalBackend(vault), Secret(passphrase=b"bench"))
    assert opened.has_backup(BackupId.parse("j/incr/vm/vda"))


def test_trials_need_an_existing_vault(tmp_path: Path, images: tuple[Path, Path, Path]) -> None:
    base, _, _ = images
    with pytest.raises(SystemExit):
        driver.main([str(tmp_path / "vault"), str(base), "--id", "j/full/vm/vda", "--init", "--trials", "2"])
