"""Every ``raksha vault`` command end to end, as a user or a script runs it: a real subprocess,
``--json`` output, and the exit statuses of src/raksha/domain/errors.py."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import MIB, PASSWORD, RunCli, blake3_file, error_of
from raksha.cli.main import build_parser
from raksha.domain.errors import (
    EXIT_BUSY,
    EXIT_DAMAGED,
    EXIT_ERROR,
    EXIT_KEY,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
)

CliJson = Callable[..., Any]
MakeImage = Callable[..., Path]
MakeChanged = Callable[..., tuple[Path, list[list[int]]]]
FULL = "job1/run1/vm1/vda"
INC = "job1/run2/vm1/vda"


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path the parser knows: (), ('vault',), ('vault', 'init'), ..., ('vault', 'key', 'add')."""
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _commands(sub, (*prefix, name))
    return out


COMMANDS = _commands(build_parser())


def test_every_command_is_documented_in_docs_cli_md() -> None:
    """The reference table in docs/cli.md and the parser list the same commands."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    documented = set(re.findall(r"^\| `raksha vault ([a-z-]+)", doc, re.M))
    vault_cmds = {c[1] for c in COMMANDS if len(c) == 2 and c[0] == "vault"}
    assert vault_cmds == documented
    assert {"init", "backup", "restore", "list", "verify", "prune", "delete", "gc", "key"} <= vault_cmds
    key_cmds = {c[2] for c in COMMANDS if c[:2] == ("vault", "key") and len(c) == 3}
    assert key_cmds == {"list", "add", "passwd", "remove"}
    assert "key list|add|passwd|remove" in doc.replace("\\|", "|")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "raksha")
def test_help_works_for_every_command(run_cli: RunCli, command: tuple[str, ...]) -> None:
    rc, out, err = run_cli(*command, "--help")
    assert rc == EXIT_OK, err
    assert out.startswith(f"usage: raksha {' '.join(command)}".rstrip())
    assert err == ""


def test_version(run_cli: RunCli) -> None:
    rc, out, _ = run_cli("--version")
    assert rc == 0 and out.startswith("raksha ")


# -- init -------------------------------------------------------------------------------------------


def test_init_plain(cli_json: CliJson, tmp_path: Path) -> None:
    doc = cli_json("vault", "init", tmp_path / "v", "--chunk-size", "64K")
    assert doc["encrypted"] is False and doc["chunk_size"] == 65536 and len(doc["vault_id"]) == 32
    config = json.loads((tmp_path / "v" / "config").read_text())
    assert config["version"] == 1 and config["vault_id"] == doc["vault_id"] and config["encryption"] is None
    assert not (tmp_path / "v" / "keys").exists()


def test_init_encrypted(cli_json: CliJson, tmp_path: Path) -> None:
    doc = cli_json("vault", "init", tmp_path / "v", "--encrypt", "--kdf-memory", "8M", password=PASSWORD)
    assert doc["encrypted"] is True and doc["chunk_size"] == MIB
    keys = list((tmp_path / "v" / "keys").iterdir())
    assert len(keys) == 1
    key = json.loads(keys[0].read_text())
    assert key["kdf"]["algorithm"] == "argon2id" and key["kdf"]["memory_kib"] == 8192
    assert PASSWORD not in keys[0].read_text()


def test_init_refuses_an_existing_vault(cli_json: CliJson, vault: Path) -> None:
    before = (vault / "config").read_bytes()
    err = error_of(json.dumps(cli_json("vault", "init", vault, expect=EXIT_ERROR)))
    assert err["code"] == "VAULT_EXISTS"
    assert (vault / "config").read_bytes() == before


def test_init_encrypted_without_a_passphrase_fails_cleanly(run_cli: RunCli, tmp_path: Path) -> None:
    rc, _, err = run_cli("vault", "init", tmp_path / "v", "--encrypt")
    assert rc == EXIT_KEY and "VAULT_KEY_REQUIRED" in err and "Traceback" not in err
    assert not (tmp_path / "v" / "config").exists()


# -- backup, restore, list, verify ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "encrypted"])
def test_backup_incremental_restore_list_verify(request: pytest.FixtureRequest, cli_json: CliJson,
                                                make_image: MakeImage, make_changed_copy: MakeChanged,
                                                outputs: Path, kind: str) -> None:
    vault: Path = request.getfixturevalue("vault" if kind == "plain" else "encrypted_vault")
    pw = PASSWORD if kind == "encrypted" else None
    base = make_image("base.img", 16 * MIB, seed=21)
    changed, _ = make_changed_copy(base, "changed.img", fraction=0.01, seed=22)

    full = cli_json("vault", "backup", vault, base, "--id", FULL, "--hint", "ticket=OPS-1", password=pw)
    inc = cli_json("vault", "backup", vault, changed, "--id", INC, "--parent", FULL,
                   "--changed-extents", changed.with_suffix(".json"), password=pw)

    assert full["id"] == FULL and full["kind"] == "full" and full["parent"] is None
    assert full["virtual_size"] == 16 * MIB and full["bytes_stored"] > 0
    assert inc["kind"] == "incremental" and inc["parent"] == FULL
    assert inc["chunks_from_parent"] > 0 and inc["bytes_read"] < full["bytes_read"]

    raw = cli_json("vault", "restore", vault, INC, outputs / "inc.img", password=pw)
    qcow = cli_json("vault", "restore", vault, FULL, outputs / "full.qcow2", "--format", "qcow2", password=pw)
    assert raw["verified"] is True and raw["content_digest"] == inc["content_digest"]
    assert qcow["format"] == "qcow2"
    assert blake3_file(outputs / "inc.img") == blake3_file(changed)
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(base),
                               str(outputs / "full.qcow2")], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr

    rows = cli_json("vault", "list", vault, password=pw)
    assert [(r["id"], r["kind"], r["parent"]) for r in rows] == [(FULL, "full", None), (INC, "incremental", FULL)]
    assert rows[0]["virtual_size"] == 16 * MIB and rows[0]["content_digest"] == full["content_digest"]
    assert cli_json("vault", "list", vault, "--prefix", "job1/run2/", password=pw)[0]["id"] == INC
    assert cli_json("vault", "list", vault, "--prefix", "job2/", password=pw) == []

    report = cli_json("vault", "verify", vault, password=pw)
    assert report["ok"] is True and report["backups_checked"] == 2 and report["chunks_checked"] > 0
    assert report["damaged_backups"] == {} and report["damaged_objects"] == []
    quick = cli_json("vault", "verify", vault, "--no-read-data", password=pw)
    assert quick["ok"] is True and quick["read_data"] is False and quick["bytes_read"] == 0
    halves = [cli_json("vault", "verify", vault, "--read-data-subset", f"{n}/2", password=pw) for n in (1, 2)]
    assert all(h["ok"] and h["read_data_subset"] == f"{n}/2" for n, h in zip((1, 2), halves, strict=True))
    assert sum(h["bytes_read"] for h in halves) == report["bytes_read"]
    assert sum(h["packs_checked"] for h in halves) == report["packs_checked"]


@pytest.mark.parametrize("args", [["--read-data-subset", "0/3"], ["--read-data-subset", "150%"],
                                  ["--read-data-subset", "1/2", "--no-read-data"]])
def test_verify_refuses_a_bad_data_subset_before_opening_the_vault(run_cli: RunCli, tmp_path: Path,
                                                                   args: list[str]) -> None:
    rc, out, err = run_cli("vault", "verify", tmp_path / "no-vault-here", *args)
    assert rc == EXIT_USAGE and out == ""
    assert "--read-data-subset" in err and "Traceback" not in err


def test_human_output_without_json(run_cli: RunCli, vault: Path, make_image: MakeImage, outputs: Path) -> None:
    image = make_image("disk.img", 4 * MIB)
    rc, out, err = run_cli("vault", "backup", vault, image, "--id", FULL)
    assert rc == 0, err
    assert out.startswith(f"full backup {FULL}: read ")
    rc, out, _ = run_cli("vault", "list", vault)
    assert rc == 0 and out.splitlines()[0].split() == ["ID", "KIND", "CREATED", "SIZE", "PARENT"]
    assert FULL in out
    rc, out, _ = run_cli("vault", "verify", vault)
    assert rc == 0 and "no damage found" in out
    rc, out, _ = run_cli("vault", "restore", vault, FULL, outputs / "x.img")
    assert rc == 0 and out.startswith(f"restored {FULL} to ")


def test_restore_refuses_to_overwrite_without_force(cli_json: CliJson, vault: Path, make_image: MakeImage,
                                                    outputs: Path) -> None:
    image = make_image("disk.img", 4 * MIB)
    cli_json("vault", "backup", vault, image, "--id", FULL)
    out = outputs / "restored.img"
    out.write_text("keep me")

    err = cli_json("vault", "restore", vault, FULL, out, expect=EXIT_ERROR)["error"]
    assert err["code"] == "OUTPUT_EXISTS" and "--force" in err["message"]
    assert out.read_text() == "keep me"

    cli_json("vault", "restore", vault, FULL, out, "--force")
    assert blake3_file(out) == blake3_file(image)


def test_restore_over_an_image_that_holds_a_later_backup_writes_only_what_differs(
        cli_json: CliJson, vault: Path, make_image: MakeImage, make_changed_copy: MakeChanged,
        tmp_path: Path) -> None:
    """``--since``: OUTPUT holds that backup except in ``--changed-extents`` (say, from ``rbd diff``)."""
    base = make_image("base.img", 16 * MIB, seed=31)
    changed, extents = make_changed_copy(base, "changed.img", fraction=0.01, seed=32)
    cli_json("vault", "backup", vault, base, "--id", FULL)
    cli_json("vault", "backup", vault, changed, "--id", INC, "--parent", FULL,
             "--changed-extents", changed.with_suffix(".json"))
    # The disk moved on after INC: 8 KiB written in a chunk INC did not change.
    touched = {off // MIB for off, n in extents} | {(off + n - 1) // MIB for off, n in extents}
    spot = min(set(range(16)) - touched) * MIB + 4096
    disk = tmp_path / "disk.img"
    disk.write_bytes(changed.read_bytes())
    with open(disk, "r+b") as f:
        f.seek(spot)
        f.write(b"\xab" * 8192)
    since_inc = tmp_path / "since.json"
    since_inc.write_text(json.dumps([[spot, 8192]]))

    out = cli_json("vault", "restore", vault, FULL, disk, "--since", INC, "--changed-extents", since_inc)
    assert blake3_file(disk) == blake3_file(base) and out["verified"] is True
    # The chunks INC changed, whole; of the others only the 8 KiB written since.
    assert out["bytes_written"] == len(touched) * MIB + 8192
    # Onto the same point it already holds, nothing is written.
    again = cli_json("vault", "restore", vault, FULL, disk, "--since", FULL)
    assert again["bytes_written"] == 0 and blake3_file(disk) == blake3_file(base)

    # A qcow2 image, through qemu-nbd.
    qcow = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(changed), str(qcow)], check=True)
    cli_json("vault", "restore", vault, FULL, qcow, "--since", INC, "--format", "qcow2")
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(base), str(qcow)],
                              capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr


def test_restore_over_refuses_what_cannot_be_right(cli_json: CliJson, vault: Path, make_image: MakeImage,
                                                  tmp_path: Path) -> None:
    image = make_image("disk.img", 4 * MIB)
    cli_json("vault", "backup", vault, image, "--id", FULL)
    other = make_image("other.img", 8 * MIB)
    cli_json("vault", "backup", vault, other, "--id", INC)
    extents = tmp_path / "e.json"
    extents.write_text("[[0, 4096]]")
    cases = [
        (("--changed-extents", extents), image, "INVALID_INPUT"),  # no --since
        (("--since", INC), image, "SIZE_MISMATCH"),  # backups of disks of other sizes
        (("--since", FULL), tmp_path / "missing.img", "OUTPUT_NOT_FOUND"),
        (("--since", FULL), other, "SIZE_MISMATCH"),  # the image is not of the backup's size
    ]
    before = blake3_file(image)
    for args, output, code in cases:
        rc = EXIT_NOT_FOUND if code == "OUTPUT_NOT_FOUND" else EXIT_USAGE
        err = cli_json("vault", "restore", vault, FULL, output, *args, expect=rc)["error"]
        assert err["code"] == code, (args, err)
    assert blake3_file(image) == before


def test_an_image_open_in_qemu_is_neither_written_over_nor_backed_up(cli_json: CliJson, vault: Path,
                                                                     make_image: MakeImage, tmp_path: Path) -> None:
    """QEMU's own image locks say a VM (here a writable qemu-nbd, which locks as a VM's disk does) has it open."""
    from raksha.vault.sources.nbd import QemuNbdExport

    image = make_image("disk.img", 4 * MIB)
    cli_json("vault", "backup", vault, image, "--id", FULL)
    in_use = tmp_path / "in-use.img"
    in_use.write_bytes(b"\xab" * (4 * MIB))
    export = QemuNbdExport(str(in_use), "raw", writable=True)
    try:
        for args in (("--since", FULL), ("--force",)):
            err = cli_json("vault", "restore", vault, FULL, in_use, *args, expect=EXIT_BUSY)["error"]
            assert err["code"] == "IMAGE_IN_USE" and "shut the VM off" in err["message"], (args, err)
        # Nor read as if it held one point in time, as qemu-img refuses too.
        for command in (("backup", vault, in_use, "--id", INC), ("compare", vault, FULL, in_use)):
            err = cli_json("vault", *command, expect=EXIT_BUSY)["error"]
            assert err["code"] == "IMAGE_IN_USE" and "freezes it" in err["message"], (command, err)
    finally:
        export.close()
    assert in_use.read_bytes() == b"\xab" * (4 * MIB)
    cli_json("vault", "restore", vault, FULL, in_use, "--since", FULL, "--changed-extents", _all(tmp_path))
    assert blake3_file(in_use) == blake3_file(image)  # once QEMU let go of it


def _all(tmp_path: Path) -> Path:
    extents = tmp_path / "all.json"
    extents.write_text(json.dumps([[0, 4 * MIB]]))
    return extents


def test_compare_reads_an_image_back_against_a_backup(cli_json: CliJson, encrypted_vault: Path,
                                                      make_image: MakeImage, make_changed_copy: MakeChanged,
                                                      tmp_path: Path) -> None:
    vault, pw = encrypted_vault, PASSWORD
    base = make_image("base.img", 16 * MIB, seed=41)
    changed, extents = make_changed_copy(base, "changed.img", fraction=0.01, seed=42)
    cli_json("vault", "backup", vault, base, "--id", FULL, password=pw)
    inc = cli_json("vault", "backup", vault, changed, "--id", INC, "--parent", FULL,
                   "--changed-extents", changed.with_suffix(".json"), password=pw)
    assert inc["chunks_delta"] > 0  # chunks changed in part: delta layers, compared byte for byte

    same = cli_json("vault", "compare", vault, INC, changed, password=pw)
    assert same["identical"] is True and same["chunks_differing"] == 0 and 0 < same["bytes_read"] <= 16 * MIB
    other = cli_json("vault", "compare", vault, FULL, changed, expect=EXIT_ERROR, password=pw)
    assert other["identical"] is False and other["chunks_differing"] > 0

    # One byte changed in a chunk with layers: named.
    off = extents[0][0]
    with open(changed, "r+b") as f:
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 1]))
    flipped = cli_json("vault", "compare", vault, INC, changed, expect=EXIT_ERROR, password=pw)
    assert flipped["chunks_differing"] == 1 and flipped["first_differing"] == [off // MIB]

    # A qcow2 image, and one of another size.
    qcow = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(base), str(qcow)], check=True)
    assert cli_json("vault", "compare", vault, FULL, qcow, password=pw)["identical"] is True
    small = make_image("small.img", 8 * MIB)
    sized = cli_json("vault", "compare", vault, FULL, small, expect=EXIT_ERROR, password=pw)
    assert sized["identical"] is False and sized["image_size"] == 8 * MIB and sized["bytes_read"] == 0


def test_delete(cli_json: CliJson, vault: Path, make_image: MakeImage, outputs: Path) -> None:
    image = make_image("disk.img", 4 * MIB)
    cli_json("vault", "backup", vault, image, "--id", FULL)
    cli_json("vault", "backup", vault, image, "--id", INC)

    assert cli_json("vault", "delete", vault, FULL) == {"deleted": FULL}

    assert [r["id"] for r in cli_json("vault", "list", vault)] == [INC]
    assert cli_json("vault", "delete", vault, FULL, expect=EXIT_NOT_FOUND)["error"]["code"] == "BACKUP_NOT_FOUND"
    err = cli_json("vault", "restore", vault, FULL, outputs / "x.img", expect=EXIT_NOT_FOUND)["error"]
    assert err["code"] == "BACKUP_NOT_FOUND"
    assert not (outputs / "x.img").exists()
    cli_json("vault", "restore", vault, INC, outputs / "inc.img")
    assert blake3_file(outputs / "inc.img") == blake3_file(image)


def test_prune_and_gc(cli_json: CliJson, run_cli: RunCli, vault: Path, make_image: MakeImage,
                      make_changed_copy: MakeChanged, outputs: Path) -> None:
    v1 = make_image("v1.img", 8 * MIB, seed=23)
    v2, _ = make_changed_copy(v1, "v2.img", fraction=0.5, seed=24)
    other = make_image("other.img", 4 * MIB, seed=25)
    cli_json("vault", "backup", vault, v1, "--id", "job1/run1/vm1/vda")
    cli_json("vault", "backup", vault, other, "--id", "job1/run1/vm2/vda")
    cli_json("vault", "backup", vault, v2, "--id", "job1/run2/vm1/vda")
    all_ids = ["job1/run1/vm1/vda", "job1/run1/vm2/vda", "job1/run2/vm1/vda"]

    # Retention is per disk (job/vm/disk): keep-last 1 keeps one backup of each.
    dry = cli_json("vault", "prune", vault, "--keep-last", "1", "--dry-run")
    assert dry["dry_run"] is True and dry["deleted"] == ["job1/run1/vm1/vda"]
    assert sorted(k["id"] for k in dry["kept"]) == ["job1/run1/vm2/vda", "job1/run2/vm1/vda"]
    assert [r["id"] for r in cli_json("vault", "list", vault)] == all_ids

    real = cli_json("vault", "prune", vault, "--keep-last", "1")
    assert real["dry_run"] is False and real["deleted"] == ["job1/run1/vm1/vda"]
    assert [r["id"] for r in cli_json("vault", "list", vault)] == all_ids[1:]

    data_before = sum(f.stat().st_size for f in (vault / "data").rglob("*") if f.is_file())
    gc_dry = cli_json("vault", "gc", vault, "--grace", "0s", "--dry-run")
    assert gc_dry["dry_run"] is True and gc_dry["bytes_freed"] > 0
    rc, out, err = run_cli("vault", "gc", vault, "--grace", "0s", "--json", "--progress", "lines")
    assert rc == 0, err
    gc = json.loads(out)
    assert gc["dry_run"] is False and gc["bytes_freed"] > 0 and gc["backups"] == 2
    assert "gc: mark: 100.0%  2/2 backups" in err  # progress on stderr, the report alone on stdout
    data_after = sum(f.stat().st_size for f in (vault / "data").rglob("*") if f.is_file())
    assert data_after < data_before

    assert cli_json("vault", "verify", vault)["ok"] is True
    cli_json("vault", "restore", vault, "job1/run2/vm1/vda", outputs / "v2.img")
    cli_json("vault", "restore", vault, "job1/run1/vm2/vda", outputs / "other.img")
    assert blake3_file(outputs / "v2.img") == blake3_file(v2)
    assert blake3_file(outputs / "other.img") == blake3_file(other)


def test_gc_keeps_young_data_by_default(cli_json: CliJson, vault: Path, make_image: MakeImage) -> None:
    cli_json("vault", "backup", vault, make_image("a.img", 4 * MIB), "--id", FULL)
    cli_json("vault", "delete", vault, FULL)
    report = cli_json("vault", "gc", vault)  # default grace: 1 h
    assert report["bytes_freed"] == 0 and report["young_packs_kept"] >= 1
    assert any((vault / "data").rglob("*/*"))


# -- keys -------------------------------------------------------------------------------------------


def test_key_list_add_passwd_remove(cli_json: CliJson, run_cli: RunCli, encrypted_vault: Path,
                                    make_image: MakeImage, tmp_path: Path, outputs: Path) -> None:
    vault = encrypted_vault
    image = make_image("disk.img", 8 * MIB, seed=26)
    cli_json("vault", "backup", vault, image, "--id", FULL, password=PASSWORD)
    keyfile = tmp_path / "vault.key"
    keyfile.write_bytes(bytes(range(64)))
    new_pw = tmp_path / "new-passphrase"
    new_pw.write_text("a much better passphrase\n")

    keys = cli_json("vault", "key", "list", vault, password=PASSWORD)
    assert [k["kdf"] for k in keys] == ["argon2id"]
    original = keys[0]["id"]

    added = cli_json("vault", "key", "add", vault, "--new-key-file", keyfile, password=PASSWORD)["added"]
    assert sorted(k["id"] for k in cli_json("vault", "key", "list", vault, "--key-file", keyfile)) == sorted(
        [original, added])

    changed = cli_json("vault", "key", "passwd", vault, "--new-password-file", new_pw, "--kdf-memory", "8M",
                       password=PASSWORD)
    assert changed["removed"] == [original]  # only the key the old passphrase opened
    assert sorted(k["id"] for k in cli_json("vault", "key", "list", vault, "--key-file", keyfile)) == sorted(
        [added, changed["added"]])

    rc, out, err = run_cli("vault", "list", vault, "--json", password=PASSWORD)
    assert rc == EXIT_KEY and error_of(out)["code"] == "VAULT_KEY_WRONG", err
    assert "Traceback" not in err
    cli_json("vault", "restore", vault, FULL, outputs / "a.img", "--password-file", new_pw)
    assert blake3_file(outputs / "a.img") == blake3_file(image)
    cli_json("vault", "restore", vault, FULL, outputs / "b.img", password="a much better passphrase")
    cli_json("vault", "restore", vault, FULL, outputs / "c.img", "--key-file", keyfile)
    assert blake3_file(outputs / "c.img") == blake3_file(image)

    assert cli_json("vault", "key", "remove", vault, added, "--password-file", new_pw) == {"removed": added}
    err_doc = cli_json("vault", "list", vault, "--key-file", keyfile, expect=EXIT_KEY)["error"]
    assert err_doc["code"] == "VAULT_KEY_WRONG"
    last = cli_json("vault", "key", "remove", vault, changed["added"], "--password-file", new_pw,
                    expect=EXIT_USAGE)["error"]
    assert last["code"] == "VAULT_LAST_KEY"
    missing = cli_json("vault", "key", "remove", vault, "0" * 32, "--password-file", new_pw,
                       expect=EXIT_NOT_FOUND)["error"]
    assert missing["code"] == "KEY_NOT_FOUND"
    assert cli_json("vault", "verify", vault, "--password-file", new_pw)["ok"] is True


def test_key_passwd_needs_the_new_passphrase_explicitly(cli_json: CliJson, encrypted_vault: Path) -> None:
    """RAKSHA_PASSWORD is the current passphrase; it must not silently become the new one too."""
    err = cli_json("vault", "key", "passwd", encrypted_vault, "--kdf-memory", "8M", password=PASSWORD,
                   expect=EXIT_USAGE)["error"]
    assert err["code"] == "NEW_SECRET_REQUIRED" and "--new-password-file" in err["message"]
    assert len(cli_json("vault", "key", "list", encrypted_vault, password=PASSWORD)) == 1


def test_keys_of_a_plaintext_vault(cli_json: CliJson, vault: Path, tmp_path: Path) -> None:
    assert cli_json("vault", "key", "list", vault) == []
    keyfile = tmp_path / "k"
    keyfile.write_bytes(bytes(32))
    err = cli_json("vault", "key", "add", vault, "--new-key-file", keyfile, expect=EXIT_USAGE)["error"]
    assert err["code"] == "VAULT_NOT_ENCRYPTED"


# -- errors and exit statuses -----------------------------------------------------------------------


def test_errors_in_json_carry_a_stable_code(run_cli: RunCli, tmp_path: Path) -> None:
    rc, out, err = run_cli("vault", "list", tmp_path / "nowhere", "--json")
    assert rc == EXIT_NOT_FOUND
    doc = error_of(out)
    assert doc["code"] == "VAULT_NOT_FOUND" and doc["retryable"] is False and str(tmp_path / "nowhere") in doc[
        "message"]
    assert err.startswith("raksha: error [VAULT_NOT_FOUND]: ")


def test_a_directory_that_is_not_a_vault(cli_json: CliJson, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert cli_json("vault", "verify", tmp_path / "empty", expect=EXIT_NOT_FOUND)["error"]["code"] == \
        "VAULT_NOT_FOUND"


def test_exit_status_for_a_damaged_vault_is_3(cli_json: CliJson, vault: Path, make_image: MakeImage) -> None:
    cli_json("vault", "backup", vault, make_image("a.img", 2 * MIB), "--id", FULL)
    pack = next(p for p in (vault / "data").rglob("*") if p.is_file())
    pack.write_bytes(pack.read_bytes()[: pack.stat().st_size // 2])
    report = cli_json("vault", "verify", vault, expect=EXIT_DAMAGED)
    assert report["ok"] is False and FULL in report["damaged_backups"]


def test_rebuild_index(cli_json: CliJson, vault: Path, make_image: MakeImage, outputs: Path) -> None:
    image = make_image("a.img", 8 * MIB)
    cli_json("vault", "backup", vault, image, "--id", FULL)
    for index in (vault / "index").iterdir():
        index.unlink()
    assert cli_json("vault", "verify", vault, expect=EXIT_DAMAGED)["ok"] is False

    report = cli_json("vault", "rebuild-index", vault)

    assert report["packs_read"] >= 1 and report["chunks_indexed"] > 0 and report["unreadable_packs"] == []
    assert cli_json("vault", "verify", vault)["ok"] is True
    cli_json("vault", "restore", vault, FULL, outputs / "a.img")
    assert blake3_file(outputs / "a.img") == blake3_file(image)


USAGE_ERRORS: list[tuple[list[str], str]] = [
    (["vault"], "required: ACTION"),
    (["vault", "backup"], "the following arguments are required"),
    (["vault", "backup", "{vault}", "{image}"], "the following arguments are required: --id"),
    (["vault", "backup", "{vault}", "{image}", "--id", "not-an-id"], "INVALID_BACKUP_ID"),
    (["vault", "backup", "{vault}", "{image}", "--id", "a/b/c/d/e"], "INVALID_BACKUP_ID"),
    (["vault", "backup", "{vault}", "{image}", "--id", "a/b/c/../d"], "INVALID_BACKUP_ID"),
    (["vault", "backup", "{vault}", "{image}", "--id", FULL, "--parent", "x"], "INVALID_BACKUP_ID"),
    (["vault", "backup", "{vault}", "{image}", "--id", FULL, "--threads", "0"], "must be at least 1"),
    (["vault", "backup", "{vault}", "{image}", "--id", FULL, "--hint", "novalue"], "INVALID_HINT"),
    (["vault", "backup", "{vault}", "{image}", "--id", FULL, "--changed-extents", "{extents}"], "PARENT_REQUIRED"),
    (["vault", "backup", "{vault}", "{image}", "--id", INC, "--parent", FULL, "--changed-extents", "{image}"],
     "EXTENTS_INVALID"),
    (["vault", "backup", "{vault}", "{image}", "--id", FULL, "--format", "qcow2"], "IMAGE_INVALID"),
    (["vault", "restore", "{vault}", "bad id", "{out}"], "INVALID_BACKUP_ID"),
    (["vault", "restore", "{vault}", FULL, "{out}", "--format", "vmdk"], "invalid choice"),
    (["vault", "init", "{new}", "--chunk-size", "12X"], "not a size"),
    (["vault", "init", "{new}", "--chunk-size", "3M"], "INVALID_CHUNK_SIZE"),
    (["vault", "init", "{new}", "--chunk-size", "16K"], "INVALID_CHUNK_SIZE"),
    (["vault", "init", "{new}", "--compression-level", "99"], "INVALID_COMPRESSION"),
    (["vault", "gc", "{vault}", "--grace", "soon"], "not a duration"),
    (["vault", "prune", "{vault}", "--keep-last", "one"], "invalid int value"),
    (["vault", "frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize(("argv", "message"), USAGE_ERRORS, ids=[" ".join(a[1:3]) + f" [{m}]"
                                                                  for a, m in USAGE_ERRORS])
def test_usage_errors_exit_2_with_a_clear_message(run_cli: RunCli, vault: Path, make_image: MakeImage,
                                                  tmp_path: Path, argv: list[str], message: str) -> None:
    image = make_image("a.img", 2 * MIB)
    if "--parent" in argv and "{image}" in argv[argv.index("--parent") + 2:]:
        run_cli("vault", "backup", vault, image, "--id", FULL)  # the parent exists; the extents file is bad
    before = sorted(vault.rglob("Backup"))
    extents = tmp_path / "extents.json"
    extents.write_text("[[0, 4096]]")
    subst = {"{vault}": str(vault), "{image}": str(image), "{out}": str(tmp_path / "out.img"),
             "{new}": str(tmp_path / "new"), "{extents}": str(extents)}
    rc, out, err = run_cli(*[subst.get(a, a) for a in argv])
    assert rc == EXIT_USAGE, (out, err)
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.img").exists() and not (tmp_path / "new" / "config").exists()
    assert sorted(vault.rglob("Backup")) == before
