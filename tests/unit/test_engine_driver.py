"""The benchmark's API incremental (bench/run.py through bench/engine_driver.py): trials from one vault state."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from conftest import load_bench
from raksha.vault.backends.local import LocalBackend
from raksha.vault.format.keys import Secret
from raksha.vault.format.naming import BackupId
from raksha.vault.repository import Vault

MIB = 1 << 20

run = load_bench("run")


def test_the_api_incremental_runs_its_trials_from_the_same_vault_state(tmp_path: Path) -> None:
    data = os.urandom(4 * MIB)
    base, changed, extents = tmp_path / "base.img", tmp_path / "changed.img", tmp_path / "changed.json"
    base.write_bytes(data)
    changed.write_bytes(data[: MIB + 4096] + os.urandom(8192) + data[MIB + 12288 :])
    extents.write_text(json.dumps([[MIB + 4096, 8192]]))
    full = run.Input("base", base, "bench/full/vm/vda")
    incr = run.Input("changed", changed, "bench/incr/vm/vda", parent_id=full.raksha_id, extents_json=extents)
    tool = run.Raksha(tmp_path / "work", timeout=120)
    tool.init()
    assert run.backup_phase(tool, full).ok
    tool.snapshot_after_full()

    result = run.api_phase(tool, "incremental_api", incr, "warm")

    assert result.report is not None
    trials = result.report["seconds_trials"]
    assert len(trials) == run.API_INCREMENTAL_TRIALS and result.seconds == sorted(trials)[len(trials) // 2]
    assert result.bytes_read == 8192  # every trial read only the change: none saw another's backup
    assert result.bytes is not None and result.bytes > 0  # the last trial stored into the vault itself
    # and the others' copies are gone
    assert sorted(p.name for p in tool.root.iterdir() if p.name.startswith("vault-after")) == ["vault-after-full"]
    vault = Vault.open(LocalBackend(tool.api_repo), Secret(passphrase=run.PASSWORD.encode()))
    assert vault.has_backup(BackupId.parse(incr.raksha_id))


def test_the_warm_up_leaves_a_backups_buffers_for_the_measured_one_and_nothing_else(tmp_path: Path) -> None:
    """The agent has backed up before: the measured backup finds the pool as the agent's would."""
    from raksha.vault import malloc
    from raksha.vault.format.config import VaultConfig

    driver = load_bench("engine_driver")
    malloc.POOL.clear()
    before = set(os.listdir(tempfile.gettempdir()))
    driver.warm_up(VaultConfig.new(encrypted=True), size=4 * MIB)
    assert malloc.POOL.held >= 16 * MIB + 8 * MIB  # the pipeline's buffers and the packer's
    assert set(os.listdir(tempfile.gettempdir())) <= before  # its image and scratch vault are gone
    malloc.POOL.clear()
