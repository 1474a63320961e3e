"""The embedded server's folder: others may pass through it to the restored disks, never read the rest."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from oslo_config import cfg

from raksha import conf as config
from raksha.db.migrate import upgrade
from raksha.domain.errors import InvalidInput
from raksha.wsgi.embedded import prepare_data_dir


def settings(data: Path, **groups: dict[str, str]) -> cfg.ConfigOpts:
    conf = config.load([])
    conf.set_override("data_dir", str(data))
    for group, values in groups.items():
        for name, value in values.items():
            conf.set_override(name, value, group=group)
    return conf


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_folder_lets_qemu_reach_restored_disks_and_keeps_the_rest_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    conf = settings(data)
    prepare_data_dir(conf)
    assert mode(data) == 0o711
    assert mode(data / "restored") == 0o711
    assert mode(data / "vault") == 0o700
    upgrade(config.database_url(conf))  # the database, made by the server's first start
    assert mode(data / "raksha.sqlite") == 0o600


def test_an_earlier_private_folder_is_opened_for_passing_and_its_contents_closed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "vault").mkdir(mode=0o755)
    (data / "raksha.sqlite").write_bytes(b"")
    (data / "raksha.sqlite-wal").write_bytes(b"")
    os.chmod(data / "raksha.sqlite", 0o644)
    os.chmod(data / "raksha.sqlite-wal", 0o644)
    (data / "vault.key").write_bytes(b"k")
    os.chmod(data / "vault.key", 0o644)
    prepare_data_dir(settings(data))
    assert mode(data) == 0o701
    assert mode(data / "vault") == 0o700
    assert mode(data / "raksha.sqlite") == mode(data / "raksha.sqlite-wal") == 0o600
    assert mode(data / "vault.key") == 0o600
    assert mode(data / "restored") == 0o711


def test_what_the_operator_placed_elsewhere_is_left_as_it_is(tmp_path: Path) -> None:
    data, vault, restored = tmp_path / "data", tmp_path / "vault", tmp_path / "restored"
    vault.mkdir(mode=0o755)
    prepare_data_dir(settings(data, vault={"path": str(vault)}, libvirt={"restore_dir": str(restored)}))
    assert mode(vault) == 0o755
    assert not (data / "vault").exists()
    assert mode(restored) == 0o711


def test_a_folder_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(InvalidInput) as err:
        prepare_data_dir(settings(tmp_path / "file" / "data"))
    assert err.value.code == "DATA_DIR_UNUSABLE" and str(tmp_path / "file") in err.value.message
