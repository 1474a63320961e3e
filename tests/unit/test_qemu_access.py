"""Whether QEMU's user may pass through the folders on the way to a path."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from raksha.hypervisor.qemu_access import blocking_dir, parse_dac_label


@pytest.fixture
def nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def test_a_label_names_its_user_by_number_or_by_name() -> None:
    assert parse_dac_label("+64055:+107") == (64055, 107)
    assert parse_dac_label("root:root") == (0, 0)
    assert parse_dac_label("no-such-user-here:root") is None
    assert parse_dac_label("") is None


def test_the_first_folder_others_may_not_search_blocks(tmp_path: Path, nobody: tuple[int, int]) -> None:
    tmp_path.chmod(0o711)
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    (tmp_path / "a").chmod(0o700)
    assert blocking_dir(str(inner), *nobody) == str(tmp_path / "a")
    (tmp_path / "a").chmod(0o701)  # search without read is enough
    assert blocking_dir(str(inner), *nobody) is None


def test_the_owner_and_the_group_bits_count_for_their_own(tmp_path: Path, nobody: tuple[int, int]) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a folder away needs root")
    tmp_path.chmod(0o711)
    d = tmp_path / "d"
    d.mkdir(mode=0o710)
    os.chown(d, 0, nobody[1])
    assert blocking_dir(str(d), *nobody) is None  # by its group
    os.chown(d, nobody[0], 0)
    d.chmod(0o100)
    assert blocking_dir(str(d), *nobody) is None  # by its owner
    d.chmod(0o011)
    assert blocking_dir(str(d), *nobody) == str(d)  # the owner's own bits deny it, whatever others get
