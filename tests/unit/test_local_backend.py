"""LocalBackend behaviour the conformance suite cannot express: the on-disk layout,
a full filesystem and a missing vault directory."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from raksha.domain.errors import AlreadyExists, NotFound, StorageFull
from raksha.vault.backends.base import open_backend
from raksha.vault.backends.local import LocalBackend


def partials(root: Path) -> list[Path]:
    return sorted(root.rglob("*.partial"))


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs, so writes fail with ENOSPC exactly as on a full disk."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount not installed")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.root
def test_put_on_a_full_filesystem_raises_storage_full_and_cleans_up(tiny_fs: Path) -> None:
    backend = LocalBackend(tiny_fs / "vault", create=True)
    kept = os.urandom(256 << 10)
    backend.put("data/ab/kept", kept)

    with pytest.raises(StorageFull) as caught:
        backend.put("data/cd/huge", os.urandom(4 << 20))
    assert caught.value.code == "STORAGE_FULL"
    assert "data/cd/huge" in str(caught.value) and "No space left" in str(caught.value)

    # Overwriting in place must not destroy the object it would have replaced.
    with pytest.raises(StorageFull):
        backend.put("data/ab/kept", os.urandom(4 << 20), overwrite=True)

    assert partials(tiny_fs) == []
    assert backend.get("data/ab/kept") == kept
    assert {i.key for i in backend.list()} == {"data/ab/kept"}
    backend.put("data/ab/small", b"space is free again")  # nothing leaked
    assert backend.get("data/ab/small") == b"space is free again"


def test_leftover_partials_are_never_listed(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path, create=True)
    backend.put("index/ab01", b"x")
    (tmp_path / "tmp" / "nested").mkdir(parents=True)
    (tmp_path / "tmp" / "x.partial").write_bytes(b"crashed mid-write")
    (tmp_path / "tmp" / "nested" / "y.partial").write_bytes(b"crashed mid-write")
    assert [i.key for i in backend.list()] == ["index/ab01"]
    assert list(backend.list("tmp")) == []
    assert list(backend.list("tmp/")) == []
    assert list(backend.list("t")) == []


def test_objects_live_at_root_slash_key_and_puts_leave_no_partials(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path, create=True)
    backend.put("data/ab/abcd", b"chunk")
    backend.put("data/ab/abcd", b"chunk 2", overwrite=True)
    backend.put_file("packs/p1", _stage(backend, b"pack"))
    assert (tmp_path / "data" / "ab" / "abcd").read_bytes() == b"chunk 2"
    assert (tmp_path / "packs" / "p1").read_bytes() == b"pack"
    assert partials(tmp_path) == []


def test_refused_put_leaves_no_partial(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path, create=True)
    backend.put("a", b"1")
    with pytest.raises(AlreadyExists, match="already exists"):
        backend.put("a", b"2")
    assert partials(tmp_path) == []


def test_missing_vault_without_create_is_vault_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as caught:
        LocalBackend(tmp_path / "nowhere")
    assert caught.value.code == "VAULT_NOT_FOUND"
    assert not (tmp_path / "nowhere").exists()


def test_create_makes_parent_directories(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "a" / "b" / "vault", create=True)
    assert (tmp_path / "a" / "b" / "vault").is_dir()
    assert backend.url == str(tmp_path / "a" / "b" / "vault")
    LocalBackend(tmp_path / "a" / "b" / "vault")  # now it exists, create is not needed


def test_open_backend_accepts_paths_and_file_urls(tmp_path: Path) -> None:
    assert isinstance(open_backend(str(tmp_path)), LocalBackend)
    assert open_backend(f"file://{tmp_path}").url == str(tmp_path)


def test_delete_prunes_empty_directories_but_keeps_top_level_ones(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path, create=True)
    backend.put("data/ab/cd/abcd01", b"1")
    backend.put("data/ef/ef01", b"2")
    assert backend.delete("data/ab/cd/abcd01")
    assert not (tmp_path / "data" / "ab").exists()
    assert (tmp_path / "data" / "ef" / "ef01").exists()
    assert backend.delete("data/ef/ef01")
    assert (tmp_path / "data").is_dir() and not (tmp_path / "data" / "ef").exists()
    backend.put("data/ab/cd/abcd01", b"again")  # pruned directories come back on demand
    assert backend.get("data/ab/cd/abcd01") == b"again"


def test_directories_are_not_objects(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path, create=True)
    backend.put("data/ab/abcd", b"1")
    for verb in (backend.get, backend.stat):
        with pytest.raises(NotFound) as caught:
            verb("data/ab")
        assert caught.value.code == "OBJECT_NOT_FOUND"
    with pytest.raises(NotFound):
        backend.get("data/ab/abcd/below-a-file")
    assert backend.delete("data/ab") is False


def test_mtime_follows_the_file_so_tests_can_age_objects(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path, create=True)
    backend.put("data/ab/abcd", b"1")
    os.utime(tmp_path / "data" / "ab" / "abcd", (1_000_000_000, 1_000_000_000))
    assert backend.stat("data/ab/abcd").mtime == 1_000_000_000
    assert [i.mtime for i in backend.list("data/")] == [1_000_000_000]


def test_foreign_files_are_not_listed(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path, create=True)
    backend.put("index/ab01", b"x")
    (tmp_path / "index" / "notes from admin.txt").write_text("hi")
    (tmp_path / "index" / "link").symlink_to(tmp_path / "index" / "ab01")
    assert [i.key for i in backend.list()] == ["index/ab01"]


def _stage(backend: LocalBackend, data: bytes) -> Path:
    path = backend.staging_dir() / "staged.part"
    path.write_bytes(data)
    return path


def test_a_new_object_makes_its_new_directories_durable_and_no_more(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A new directory's entry is in its parent: the parents of the directories a put made are
    fsynced, up to the first that was there already (a backup's run, VM and disk directories: the
    job's directory last; not the vault's root or ``backups/``, whose entries are old)."""
    from raksha.vault.backends import local

    backend = LocalBackend(tmp_path / "vault", create=True)
    backend.put("backups/job/run1/vm/vda/Backup", b"first")
    synced: list[str] = []
    real = local._fsync

    def record(path: Path, flags: int = os.O_RDONLY) -> None:
        if flags != os.O_RDONLY:
            synced.append(str(Path(path).relative_to(tmp_path / "vault")))
        real(path, flags)

    monkeypatch.setattr(local, "_fsync", record)
    backend.put("backups/job/run2/vm/vda/Backup", b"second")  # run2, vm and vda are new
    assert synced == ["backups/job/run2/vm/vda", "backups/job/run2/vm", "backups/job/run2", "backups/job"]
    synced.clear()
    backend.put("backups/job/run2/vm/vda/BackupMetadata", b"meta")  # its directory was there
    assert synced == ["backups/job/run2/vm/vda"]
