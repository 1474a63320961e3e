"""What goes wrong in real life, through the real CLI: bad inputs, wrong keys, damaged or missing
objects, a full disk, processes killed midway.

Each case checks three things: the error is clear and has a stable code (and exit status),
nothing already stored is lost (an earlier backup still restores bit-exact), and
``verify`` names exactly the backups the damage touches (and exits 3).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import MIB, PASSWORD, RAKSHA, RunCli, blake3_file, cli_env, error_of, index_objects
from raksha.domain.errors import (
    EXIT_DAMAGED,
    EXIT_ERROR,
    EXIT_FORMAT,
    EXIT_INTERRUPTED,
    EXIT_KEY,
    EXIT_NOT_FOUND,
    EXIT_STORAGE,
    EXIT_USAGE,
)
from raksha.vault.backends.local import LocalBackend
from raksha.vault.format.index import Location
from raksha.vault.format.keys import Secret
from raksha.vault.format.naming import BackupId
from raksha.vault.format.pack import pack_key
from raksha.vault.repository import Vault

CliJson = Callable[..., Any]
MakeImage = Callable[..., Path]
MakeChanged = Callable[..., tuple[Path, list[list[int]]]]
FULL = "job1/run1/vm1/vda"  # full backup of vm1
INC = "job1/run2/vm1/vda"  # incremental of vm1 from FULL
OTHER = "job1/run1/vm2/vda"  # vm2, unrelated content


@dataclass
class Scenario:
    """A vault holding FULL, INC and OTHER, with the images they were made from."""

    vault: Path
    password: str | None
    images: dict[str, Path]

    def open(self) -> Vault:
        secret = Secret(passphrase=self.password.encode()) if self.password else None
        return Vault.open(LocalBackend(self.vault), secret)

    def chunk_users(self) -> dict[bytes, set[str]]:
        vault = self.open()
        users: dict[bytes, set[str]] = {}
        for bid in (FULL, INC, OTHER):
            for cid in vault.read_manifest(BackupId.parse(bid)).blob_ids():  # chunks, bases and delta layers
                users.setdefault(cid, set()).add(bid)
        return users

    def locations(self) -> dict[bytes, Location]:
        return self.open().load_index().locations

    def pack_path(self, pack_id: bytes) -> Path:
        return self.vault / pack_key(pack_id.hex())

    def index_of_pack(self, pack_id: bytes) -> Path:
        files = index_objects(self.open())
        [index_id] = [i for i, f in files.items() if any(loc.pack_id == pack_id for loc in f.entries.values())]
        return self.vault / "index" / index_id


def flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: to show a command touched nothing."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(params=["plain", "encrypted"])
def scenario(request: pytest.FixtureRequest, tmp_path: Path, make_image: MakeImage,
             make_changed_copy: MakeChanged, cli_json: CliJson) -> Scenario:
    password = PASSWORD if request.param == "encrypted" else None
    vault = tmp_path / "vault"
    cli_json("vault", "init", vault, "--chunk-size", "64K", *(["--encrypt", "--kdf-memory", "8M"] if password else []),
             password=password)
    full = make_image("vm1-v1.img", 8 * MIB, seed=31)
    changed, _ = make_changed_copy(full, "vm1-v2.img", fraction=0.02, seed=32)
    other = make_image("vm2.img", 4 * MIB, seed=33)
    cli_json("vault", "backup", vault, full, "--id", FULL, password=password)
    cli_json("vault", "backup", vault, changed, "--id", INC, "--parent", FULL,
             "--changed-extents", changed.with_suffix(".json"), password=password)
    cli_json("vault", "backup", vault, other, "--id", OTHER, password=password)
    return Scenario(vault, password, {FULL: full, INC: changed, OTHER: other})


@pytest.fixture
def assert_restores(cli_json: CliJson, outputs: Path) -> Callable[[Scenario, str], None]:
    """``assert_restores(scenario, backup_id)``: it restores, bit-exact to the image it was made from."""
    count = [0]

    def check(sc: Scenario, backup_id: str) -> None:
        count[0] += 1
        out = outputs / f"check{count[0]}.img"
        cli_json("vault", "restore", sc.vault, backup_id, out, password=sc.password)
        assert blake3_file(out) == blake3_file(sc.images[backup_id]), f"{backup_id} does not restore bit-exact"
        out.unlink()

    return check


def verify_damage(cli_json: CliJson, sc: Scenario) -> dict[str, Any]:
    report: dict[str, Any] = cli_json("vault", "verify", sc.vault, expect=EXIT_DAMAGED, password=sc.password)
    assert report["ok"] is False
    return report


# -- bad input ------------------------------------------------------------------------------------


def test_nonexistent_image(run_cli: RunCli, vault: Path, make_image: MakeImage, tmp_path: Path,
                           cli_json: CliJson, outputs: Path) -> None:
    image = make_image("a.img", 4 * MIB)
    cli_json("vault", "backup", vault, image, "--id", FULL)
    before = tree(vault)

    rc, out, err = run_cli("vault", "backup", vault, tmp_path / "missing.img", "--id", INC, "--json")

    assert rc == EXIT_NOT_FOUND
    assert error_of(out)["code"] == "IMAGE_NOT_FOUND" and "missing.img" in error_of(out)["message"]
    assert "Traceback" not in err
    assert tree(vault) == before
    cli_json("vault", "restore", vault, FULL, outputs / "a.img")
    assert blake3_file(outputs / "a.img") == blake3_file(image)


@pytest.mark.parametrize("kind", ["directory", "empty file", "1000-byte text file"])
def test_what_is_not_a_disk_image(run_cli: RunCli, vault: Path, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "not-an-image"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty file":
        path.touch()
    else:
        path.write_text(("not a disk image, just some text\n" * 40)[:1000])
    before = tree(vault)

    rc, out, err = run_cli("vault", "backup", vault, path, "--id", FULL, "--json")

    assert rc == EXIT_USAGE, err
    doc = error_of(out)
    assert doc["code"] == "IMAGE_INVALID" and str(path) in doc["message"] and "not a disk image" in doc["message"]
    assert "Traceback" not in err
    assert tree(vault) == before


def _qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, check=True)


@pytest.mark.parametrize("names", ["backing file", "external data file"])
def test_a_raw_disk_whose_guest_wrote_a_qcow2_header_never_has_another_file_read(
        run_cli: RunCli, cli_json: CliJson, vault: Path, tmp_path: Path, outputs: Path, names: str) -> None:
    # What a guest can do to its raw disk: write at its start a qcow2 header that names a host file.
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"host private key " * (MIB // 16))
    header = tmp_path / "header.qcow2"
    if names == "backing file":
        _qemu_img("create", "-f", "qcow2", "-b", secret, "-F", "raw", header, "1M")
    else:
        _qemu_img("create", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on", header, "1M")
    disk = tmp_path / "guest-disk.raw"
    disk.write_bytes(header.read_bytes().ljust(4 * MIB, b"\0"))
    before = tree(vault)

    rc, out, err = run_cli("vault", "backup", vault, disk, "--id", FULL, "--json")

    assert rc == EXIT_USAGE, err
    doc = error_of(out)
    assert doc["code"] == "FORMAT_UNCONFIRMED" and f"with a{'n' if names[0] == 'e' else ''} {names}" in doc["message"]
    assert "--format raw" in doc["message"] and "Traceback" not in err
    assert tree(vault) == before  # nothing was read, nothing stored

    # Told it is raw, Raksha reads it as raw: the header's bytes are the disk's, the named file is not read.
    cli_json("vault", "backup", vault, disk, "--id", FULL, "--format", "raw")
    cli_json("vault", "restore", vault, FULL, outputs / "restored.raw")
    assert blake3_file(outputs / "restored.raw") == blake3_file(disk)


def test_a_qcow2_overlay_is_read_through_its_backing_file_when_its_format_is_given(
        run_cli: RunCli, cli_json: CliJson, vault: Path, make_image: MakeImage, tmp_path: Path,
        outputs: Path) -> None:
    base = make_image("base.img", 4 * MIB)
    overlay = tmp_path / "overlay.qcow2"
    _qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", overlay)
    _qemu_img("convert", "-O", "raw", overlay, tmp_path / "expected.raw")

    rc, out, _ = run_cli("vault", "backup", vault, overlay, "--id", FULL, "--json")
    assert rc == EXIT_USAGE and error_of(out)["code"] == "FORMAT_UNCONFIRMED"

    cli_json("vault", "backup", vault, overlay, "--id", FULL, "--format", "qcow2")
    cli_json("vault", "restore", vault, FULL, outputs / "restored.raw")
    assert blake3_file(outputs / "restored.raw") == blake3_file(tmp_path / "expected.raw")


def test_vault_of_an_unknown_format_version_is_refused_and_untouched(
        run_cli: RunCli, cli_json: CliJson, vault: Path, make_image: MakeImage, outputs: Path) -> None:
    image = make_image("a.img", 4 * MIB)
    cli_json("vault", "backup", vault, image, "--id", FULL)
    original = (vault / "config").read_text()
    config = json.loads(original)
    config["version"] = 2
    (vault / "config").write_text(json.dumps(config))
    before = tree(vault)

    for argv in (["backup", vault, image, "--id", INC], ["restore", vault, FULL, outputs / "x.img"],
                 ["list", vault], ["verify", vault], ["gc", vault, "--grace", "0s"], ["delete", vault, FULL],
                 ["prune", vault, "--keep-last", "1"]):
        rc, out, err = run_cli("vault", *argv, "--json")
        assert rc == EXIT_FORMAT, (argv, err)
        doc = error_of(out)
        assert doc["code"] == "VAULT_FORMAT_UNSUPPORTED" and "version 2" in doc["message"]
        assert "Traceback" not in err
    assert tree(vault) == before  # not even a lock was written
    assert not (outputs / "x.img").exists()

    (vault / "config").write_text(original)
    cli_json("vault", "restore", vault, FULL, outputs / "a.img")
    assert blake3_file(outputs / "a.img") == blake3_file(image)


# -- keys -----------------------------------------------------------------------------------------


def test_wrong_passphrase(run_cli: RunCli, cli_json: CliJson, encrypted_vault: Path, make_image: MakeImage,
                          outputs: Path) -> None:
    image = make_image("a.img", 4 * MIB)
    cli_json("vault", "backup", encrypted_vault, image, "--id", FULL, password=PASSWORD)
    before = tree(encrypted_vault)

    for argv in (["backup", encrypted_vault, image, "--id", INC], ["list", encrypted_vault],
                 ["restore", encrypted_vault, FULL, outputs / "x.img"], ["verify", encrypted_vault]):
        rc, out, err = run_cli("vault", *argv, "--json", password="not the passphrase")
        assert rc == EXIT_KEY, err
        doc = error_of(out)
        assert doc["code"] == "VAULT_KEY_WRONG" and doc["retryable"] is False
        assert "Traceback" not in err
    assert tree(encrypted_vault) == before
    cli_json("vault", "restore", encrypted_vault, FULL, outputs / "a.img", password=PASSWORD)
    assert blake3_file(outputs / "a.img") == blake3_file(image)


def test_no_passphrase_and_no_terminal(run_cli: RunCli, cli_json: CliJson, encrypted_vault: Path,
                                       make_image: MakeImage, outputs: Path) -> None:
    image = make_image("a.img", 4 * MIB)
    cli_json("vault", "backup", encrypted_vault, image, "--id", FULL, password=PASSWORD)

    for argv in (["list", encrypted_vault], ["backup", encrypted_vault, image, "--id", INC],
                 ["restore", encrypted_vault, FULL, outputs / "x.img"]):
        rc, out, err = run_cli("vault", *argv, "--json")  # stdin is /dev/null, no RAKSHA_PASSWORD
        assert rc == EXIT_KEY, err
        doc = error_of(out)
        assert doc["code"] == "VAULT_KEY_REQUIRED" and "RAKSHA_PASSWORD" in doc["message"]
        assert "Traceback" not in err
    assert [r["id"] for r in cli_json("vault", "list", encrypted_vault, password=PASSWORD)] == [FULL]


# -- damaged and missing objects ------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["shared", "incremental-only"])
def test_bit_flipped_pack(scenario: Scenario, cli_json: CliJson, run_cli: RunCli, outputs: Path,
                          assert_restores: Callable[[Scenario, str], None], victim: str) -> None:
    """One flipped bit condemns one chunk: verify names exactly the backups that use it."""
    users, locations = scenario.chunk_users(), scenario.locations()
    wanted = {FULL, INC} if victim == "shared" else {INC}
    cid = next(c for c, u in users.items() if u == wanted)
    loc = locations[cid]
    flip_bit(scenario.pack_path(loc.pack_id), loc.offset + loc.stored_length // 2)

    report = verify_damage(cli_json, scenario)
    assert set(report["damaged_backups"]) == wanted
    assert any(cid.hex() in why for reasons in report["damaged_backups"].values() for why in reasons)
    assert [d["object"] for d in report["damaged_objects"]] == [pack_key(loc.pack_id.hex())]

    damaged = sorted(wanted)[0]
    rc, out, err = run_cli("vault", "restore", scenario.vault, damaged, outputs / "bad.img", "--json",
                           password=scenario.password)
    assert rc == EXIT_DAMAGED, err
    assert error_of(out)["code"] == "VAULT_CORRUPT" and pack_key(loc.pack_id.hex()) in error_of(out)["message"]
    assert list(outputs.iterdir()) == []  # no half-restored disk, not even under a temporary name
    for bid in {FULL, INC, OTHER} - wanted:
        assert_restores(scenario, bid)


def test_truncated_pack(scenario: Scenario, cli_json: CliJson, run_cli: RunCli, outputs: Path,
                        assert_restores: Callable[[Scenario, str], None]) -> None:
    users, locations = scenario.chunk_users(), scenario.locations()
    pack_id = locations[next(c for c, u in users.items() if u == {FULL, INC})].pack_id
    path = scenario.pack_path(pack_id)
    keep = path.stat().st_size // 2
    os.truncate(path, keep)
    cut = {cid for cid, loc in locations.items() if loc.pack_id == pack_id and loc.offset + loc.stored_length > keep}
    expected = set().union(*(users[c] for c in cut))
    assert expected and OTHER not in expected

    report = verify_damage(cli_json, scenario)
    assert set(report["damaged_backups"]) == expected
    assert pack_key(pack_id.hex()) in {d["object"] for d in report["damaged_objects"]}

    rc, out, err = run_cli("vault", "restore", scenario.vault, FULL, outputs / "bad.img", "--json",
                           password=scenario.password)
    assert rc == EXIT_DAMAGED, err
    assert error_of(out)["code"] == "VAULT_CORRUPT"
    assert list(outputs.iterdir()) == []
    assert_restores(scenario, OTHER)


@pytest.mark.parametrize("damage", ["bit-flip", "truncation"])
def test_damaged_index(scenario: Scenario, cli_json: CliJson, run_cli: RunCli, outputs: Path,
                       assert_restores: Callable[[Scenario, str], None], damage: str) -> None:
    """A damaged index hides the chunks it lists; backups that need none of them still restore,
    and rebuild-index recovers the rest from the packs' own headers."""
    users, locations = scenario.chunk_users(), scenario.locations()
    pack_id = locations[next(c for c, u in users.items() if u == {FULL, INC})].pack_id
    index = scenario.index_of_pack(pack_id)
    hidden = {cid for cid, loc in locations.items() if loc.pack_id == pack_id}
    expected = set().union(*(users.get(c, set()) for c in hidden))
    assert expected == {FULL, INC}
    if damage == "bit-flip":
        flip_bit(index, index.stat().st_size // 2)
    else:
        os.truncate(index, index.stat().st_size - 7)

    report = verify_damage(cli_json, scenario)
    assert set(report["damaged_backups"]) == expected
    assert f"index/{index.name}" in {d["object"] for d in report["damaged_objects"]}

    rc, out, err = run_cli("vault", "restore", scenario.vault, FULL, outputs / "bad.img", "--json",
                           password=scenario.password)
    assert rc == EXIT_DAMAGED, err
    doc = error_of(out)
    assert doc["code"] == "VAULT_CORRUPT" and f"index/{index.name}" in doc["message"]
    assert list(outputs.iterdir()) == []
    assert_restores(scenario, OTHER)
    # Backups go on: what the damaged index hides is stored again, not referenced blindly.
    again = cli_json("vault", "backup", scenario.vault, scenario.images[FULL], "--id", "job1/run3/vm1/vda",
                     password=scenario.password)
    assert again["chunks_new"] >= len(hidden & set(users)) > 0
    scenario.images["job1/run3/vm1/vda"] = scenario.images[FULL]
    assert_restores(scenario, "job1/run3/vm1/vda")

    cli_json("vault", "rebuild-index", scenario.vault, password=scenario.password)
    assert cli_json("vault", "verify", scenario.vault, password=scenario.password)["ok"] is True
    for bid in (FULL, INC, OTHER):
        assert_restores(scenario, bid)


def test_bit_flipped_backup_manifest(scenario: Scenario, cli_json: CliJson, run_cli: RunCli, outputs: Path,
                                     assert_restores: Callable[[Scenario, str], None]) -> None:
    manifest = scenario.vault / "backupjobs" / FULL / "Backup"
    flip_bit(manifest, manifest.stat().st_size - 10)

    report = verify_damage(cli_json, scenario)
    assert list(report["damaged_backups"]) == [FULL]
    assert "VAULT_CORRUPT" in report["damaged_backups"][FULL][0]

    rc, out, err = run_cli("vault", "restore", scenario.vault, FULL, outputs / "bad.img", "--json",
                           password=scenario.password)
    assert rc == EXIT_DAMAGED, err
    doc = error_of(out)
    assert doc["code"] == "VAULT_CORRUPT" and f"backupjobs/{FULL}/Backup" in doc["message"]
    assert list(outputs.iterdir()) == []
    assert_restores(scenario, INC)  # its own manifest lists every chunk: the parent's is not needed
    assert_restores(scenario, OTHER)


def test_missing_pack(scenario: Scenario, cli_json: CliJson, run_cli: RunCli, outputs: Path,
                      assert_restores: Callable[[Scenario, str], None]) -> None:
    users, locations = scenario.chunk_users(), scenario.locations()
    pack_id = locations[next(c for c, u in users.items() if u == {INC})].pack_id
    lost = {cid for cid, loc in locations.items() if loc.pack_id == pack_id}
    expected = set().union(*(users[c] for c in lost))
    assert expected == {INC}
    scenario.pack_path(pack_id).unlink()

    report = verify_damage(cli_json, scenario)
    assert set(report["damaged_backups"]) == {INC}
    assert any("missing" in why for why in report["damaged_backups"][INC])

    rc, out, err = run_cli("vault", "restore", scenario.vault, INC, outputs / "bad.img", "--json",
                           password=scenario.password)
    assert rc == EXIT_DAMAGED, err
    doc = error_of(out)
    assert doc["code"] == "VAULT_CHUNK_MISSING" and pack_key(pack_id.hex()) in doc["message"]
    assert "Traceback" not in err
    assert list(outputs.iterdir()) == []
    assert_restores(scenario, FULL)
    assert_restores(scenario, OTHER)


def test_restore_to_an_existing_output(scenario: Scenario, cli_json: CliJson, outputs: Path) -> None:
    out = outputs / "disk.img"
    out.write_bytes(b"someone's disk")
    doc = cli_json("vault", "restore", scenario.vault, FULL, out, expect=EXIT_ERROR,
                   password=scenario.password)["error"]
    assert doc["code"] == "OUTPUT_EXISTS"
    assert out.read_bytes() == b"someone's disk"


def test_a_failed_forced_restore_keeps_the_file_it_would_have_replaced(
        scenario: Scenario, cli_json: CliJson, outputs: Path) -> None:
    users, locations = scenario.chunk_users(), scenario.locations()
    loc = locations[next(c for c, u in users.items() if FULL in u)]
    flip_bit(scenario.pack_path(loc.pack_id), loc.offset + loc.stored_length // 2)
    out = outputs / "disk.img"
    out.write_bytes(b"the previous restore")

    cli_json("vault", "restore", scenario.vault, FULL, out, "--force", expect=EXIT_DAMAGED,
             password=scenario.password)

    assert out.read_bytes() == b"the previous restore"
    assert list(outputs.iterdir()) == [out]


# -- a full disk ----------------------------------------------------------------------------------


@pytest.mark.root
def test_storage_full(tmpfs: Callable[[str], Path], cli_json: CliJson, make_image: MakeImage, outputs: Path) -> None:
    mnt = tmpfs("24m")
    vault = mnt / "vault"
    cli_json("vault", "init", vault)
    small = make_image("small.img", 4 * MIB, seed=41)
    cli_json("vault", "backup", vault, small, "--id", FULL)
    big = make_image("big.img", 96 * MIB, seed=42)  # about 38 MiB to store: does not fit

    doc = cli_json("vault", "backup", vault, big, "--id", INC, expect=EXIT_STORAGE)["error"]

    assert doc["code"] == "STORAGE_FULL" and "no space left" in doc["message"].lower()
    assert list((vault / "tmp").glob("*.partial")) == []
    assert [r["id"] for r in cli_json("vault", "list", vault)] == [FULL]
    assert list((vault / "locks").iterdir()) == []
    assert cli_json("vault", "verify", vault)["ok"] is True
    cli_json("vault", "restore", vault, FULL, outputs / "small.img")
    assert blake3_file(outputs / "small.img") == blake3_file(small)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_restore_to_a_full_disk(tmpfs: Callable[[str], Path], cli_json: CliJson, make_image: MakeImage,
                                vault: Path, fmt: str) -> None:
    """The output's disk fills while the writers write: STORAGE_FULL, and nothing is left on that disk."""
    image = make_image("big.img", 48 * MIB, seed=43)
    cli_json("vault", "backup", vault, image, "--id", FULL)
    mnt = tmpfs("16m")

    doc = cli_json("vault", "restore", vault, FULL, mnt / f"big.{fmt}", "--format", fmt,
                   expect=EXIT_STORAGE)["error"]

    assert doc["code"] == "STORAGE_FULL" and "no space left" in doc["message"].lower()
    assert list(mnt.iterdir()) == []


# -- killed processes -----------------------------------------------------------------------------


# Runs a command with Ctrl-C's default action, as from a terminal: a process started in the background of a
# non-interactive shell (CI's) inherits SIGINT ignored, and Python then leaves it ignored.
_SIGINT_DEFAULT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execv(sys.argv[1], sys.argv[1:])")


def popen_cli(*args: Any, password: str | None = None, interruptible: bool = False) -> subprocess.Popen[str]:
    argv = [str(RAKSHA), *map(str, args)]
    if interruptible:
        argv = [sys.executable, "-c", _SIGINT_DEFAULT, *argv]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(password))


def packs(vault: Path) -> set[Path]:
    return {p for p in (vault / "data").glob("*/*")} if (vault / "data").exists() else set()


def indexes(vault: Path) -> list[Path]:
    return list((vault / "index").iterdir())


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 60) -> None:
    """Poll ``condition`` every 2 ms until it holds; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command finished (exit {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


@pytest.fixture
def killer() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes started by a test; any still running at the end are killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["kill", "ctrl-c", "sigterm"])
def test_backup_stopped_midway(cli_json: CliJson, tmp_path: Path, make_image: MakeImage, outputs: Path,
                               killer: list[subprocess.Popen[str]], sig: signal.Signals) -> None:
    """Killed, the backup leaves its stored packs; interrupted (Ctrl-C, SIGTERM), its threads also finish
    their item and stop, the open pack's staged file goes and the lock is released. Either way the vault
    verifies, lists no half backup, and the re-run reuses what was stored."""
    vault = tmp_path / "vault"
    cli_json("vault", "init", vault, "--compression-level", "9")  # slower, so the signal lands midway
    small = make_image("small.img", 8 * MIB, seed=51)
    cli_json("vault", "backup", vault, small, "--id", FULL)
    big = make_image("big.img", 256 * MIB, seed=52)
    before, indexes_before = packs(vault), len(indexes(vault))
    argv = ("vault", "backup", vault, big, "--id", INC, "--threads", "1" if sig == signal.SIGKILL else "2", "--json")

    proc = popen_cli(*argv, interruptible=True)
    killer.append(proc)
    # Signalled once a pack and its index are stored (the index is written after its pack).
    wait_for(lambda: len(indexes(vault)) > indexes_before, proc, "a pack and its index were stored")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)

    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == EXIT_INTERRUPTED, err
        assert error_of(out)["code"] == "INTERRUPTED" if sig == signal.SIGTERM else "interrupted" in err
        assert list((vault / "tmp").iterdir()) == []  # no staged pack left behind
        assert list((vault / "locks").iterdir()) == []
    assert packs(vault) - before, "the stopped backup stored no pack"
    assert not (vault / "backupjobs" / INC / "Backup").exists()
    assert [r["id"] for r in cli_json("vault", "list", vault)] == [FULL]
    assert cli_json("vault", "verify", vault)["ok"] is True
    cli_json("vault", "restore", vault, FULL, outputs / "small.img")
    assert blake3_file(outputs / "small.img") == blake3_file(small)

    rerun = cli_json(*argv[:-1])

    stored_for_image = sum(p.stat().st_size for p in packs(vault) - before)
    assert rerun["chunks_deduplicated"] > 0
    assert rerun["bytes_stored"] < stored_for_image  # what the stopped run stored was reused
    cli_json("vault", "restore", vault, INC, outputs / "big.img")
    assert blake3_file(outputs / "big.img") == blake3_file(big)
    assert cli_json("vault", "verify", vault)["ok"] is True


def partials(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".raksha-partial")]


def _restore_and_kill(vault: Path, output: Path, sig: signal.Signals,
                      killer: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    """Start a restore to ``output`` and send ``sig`` once it has written some data."""
    proc = popen_cli("vault", "restore", vault, FULL, output, "--threads", "1", "--json")
    killer.append(proc)
    wait_for(lambda: any(p.stat().st_blocks > 0 for p in partials(output.parent)), proc, "data was written")
    proc.send_signal(sig)
    proc.wait(timeout=30)
    return proc


@pytest.fixture
def big_backup(cli_json: CliJson, tmp_path: Path, make_image: MakeImage) -> tuple[Path, Path]:
    vault = tmp_path / "vault"
    cli_json("vault", "init", vault)
    image = make_image("big.img", 256 * MIB, seed=53)
    cli_json("vault", "backup", vault, image, "--id", FULL)
    return vault, image


@pytest.mark.slow
def test_restore_killed_midway_leaves_no_output(cli_json: CliJson, big_backup: tuple[Path, Path], outputs: Path,
                                                killer: list[subprocess.Popen[str]]) -> None:
    vault, image = big_backup
    output = outputs / "restored.img"

    proc = _restore_and_kill(vault, output, signal.SIGKILL, killer)

    assert proc.returncode == -signal.SIGKILL
    assert not output.exists()  # the half-written disk is under a temporary name, never OUTPUT
    cli_json("vault", "restore", vault, FULL, output)  # re-runnable as is, without --force
    assert blake3_file(output) == blake3_file(image)


@pytest.mark.slow
def test_restore_terminated_midway_cleans_up(cli_json: CliJson, big_backup: tuple[Path, Path], outputs: Path,
                                             killer: list[subprocess.Popen[str]]) -> None:
    vault, image = big_backup
    output = outputs / "restored.img"

    proc = _restore_and_kill(vault, output, signal.SIGTERM, killer)

    out, err = proc.communicate()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert error_of(out)["code"] == "INTERRUPTED"
    assert list(outputs.iterdir()) == []
    assert list((vault / "locks").iterdir()) == []
    cli_json("vault", "restore", vault, FULL, output)
    assert blake3_file(output) == blake3_file(image)
