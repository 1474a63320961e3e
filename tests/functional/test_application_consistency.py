"""Application-consistent backups: the guests' pre-freeze and post-thaw hooks, run through the agent.

One group of six running guests, booted once and backed up with both strategies:

- ``app``: hooks that append their phase to a file on the data disk. It reaches ``application``; the
  backed-up point holds the pre-freeze line and not the post-thaw one (the hook ran before the point,
  its partner after it);
- ``failing``: a pre-freeze hook that exits 3: still frozen, ``filesystem``, and the reason (its
  post-thaw hook is not executable, and says so);
- ``postfail``: a good pre-freeze hook and a post-thaw hook that exits 5: ``application`` (the point
  was taken quiesced), the failure recorded, the guest thawed;
- ``hung``: a pre-freeze hook that sleeps: killed at the timeout, ``filesystem``; the run completes and
  the hang is not inside the freeze window;
- ``plain``: no hooks: ``filesystem``, saying so;
- ``bare``: no agent: ``crash``.

A run that wants only ``filesystem`` runs no hook.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, debugfs_cat, make_data_disk  # noqa: E402

from raksha.hypervisor.group_backup import GroupResult, backup_domains  # noqa: E402
from raksha.hypervisor.strategy import (  # noqa: E402
    APPLICATION,
    CRASH,
    DEFAULT_POST_THAW,
    DEFAULT_PRE_FREEZE,
    FILESYSTEM,
    Hooks,
)
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.engine.restore import restore_backup  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.format.naming import BackupId  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402

TIMEOUT = 4.0  # the hooks' timeout in these runs: the hung hook is killed after it
LOG_HOOK = '#!/bin/sh\necho "$1 $(cut -d" " -f1 /proc/uptime)" >> /mnt/vda/hooks.log\n'
HOOKS = {
    "app": {DEFAULT_PRE_FREEZE: LOG_HOOK, DEFAULT_POST_THAW: LOG_HOOK},
    "failing": {DEFAULT_PRE_FREEZE: "#!/bin/sh\necho 'database refuses to quiesce' >&2\nexit 3\n",
                DEFAULT_POST_THAW: "#!/bin/sh\nexit 0\n"},
    "postfail": {DEFAULT_PRE_FREEZE: "#!/bin/sh\nexit 0\n", DEFAULT_POST_THAW: "#!/bin/sh\necho oops >&2\nexit 5\n"},
    "hung": {DEFAULT_PRE_FREEZE: "#!/bin/sh\nsleep 1000\n"},
    "plain": {},
}


def install(guest: GuestDomain, hooks: dict[str, str], mode: str = "755") -> None:
    """Write the hooks into the running guest (its root is a tmpfs) and make them executable."""
    for path, script in hooks.items():
        code, _ = guest.exec(f"mkdir -p {Path(path).parent} && cat > {path} && chmod {mode} {path}",
                             stdin=script.encode())
        assert code == 0


def by_name(result: GroupResult) -> dict[str, tuple[str, str]]:
    return {vm.name: (vm.consistency, vm.why) for vm in result.vms}


def test_hooks_around_the_freeze_with_both_strategies(conn: libvirt.virConnect, tmp_path: Path) -> None:
    guest = build_guest()
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    names = ["app", "failing", "postfail", "hung", "plain", "bare"]
    disks = {n: make_data_disk(tmp_path / f"{n}.raw", "24M", fmt="raw") for n in names}
    doms = [GuestDomain(conn, guest, [(disks[n], "raw")], tmp_path, name=f"raksha-ac-{n}", agent=n != "bare")
            for n in names]
    try:
        for d in doms:
            d.__enter__()
        guests = dict(zip(names, doms, strict=True))
        for n in HOOKS:
            guests[n].wait_for_agent()
            install(guests[n], HOOKS[n])
        install(guests["failing"], {DEFAULT_POST_THAW: HOOKS["failing"][DEFAULT_POST_THAW]}, mode="644")
        full = [f"raksha-ac-{n}" for n in names]
        results: dict[str, GroupResult] = {}
        walls: dict[str, float] = {}
        for strategy in ("pull", "snapshot"):
            t0 = time.monotonic()
            results[strategy] = backup_domains(
                conn, full, vault, f"ac-{strategy}", "r1", strategy=strategy, hooks=Hooks(timeout=TIMEOUT),
                snapshot_options={"keep_overlay": False} if strategy == "snapshot" else None)
            walls[strategy] = time.monotonic() - t0
        # Only filesystem wanted: no hook runs.
        fs_only = backup_domains(conn, full, vault, "ac-fs", "r1", consistency="filesystem")
        _, live_log = guests["app"].exec("cat /mnt/vda/hooks.log")
        _, leftovers = guests["hung"].exec(  # the killed hook's children too
            "n=0; for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f | grep -q '^sleep 1000' && n=$((n+1)); done; "
            "echo $n")
        frozen = [d.agent("guest-fsfreeze-status") for d in doms if d.name != "raksha-ac-bare"]
        uuid_app = guests["app"].dom.UUIDString() if guests["app"].dom else ""
    finally:
        for d in doms:
            d.__exit__(None, None, None)

    for strategy, result in results.items():
        levels = by_name(result)
        assert {n: level for n, (level, _) in levels.items()} == {
            "raksha-ac-app": APPLICATION, "raksha-ac-failing": FILESYSTEM, "raksha-ac-postfail": APPLICATION,
            "raksha-ac-hung": FILESYSTEM,
            "raksha-ac-plain": FILESYSTEM, "raksha-ac-bare": CRASH}, (strategy, levels)
        why = {n.removeprefix("raksha-ac-"): w for n, (_, w) in levels.items()}
        assert "pre-freeze hook ran" in why["app"] and "post-thaw hook ran" in why["app"]
        assert "exited 3" in why["failing"] and "database refuses" in why["failing"]
        assert "post-thaw hook" in why["failing"] and "could not run" in why["failing"], why["failing"]
        assert "post-thaw hook /etc/raksha/hooks/post-thaw exited 5" in why["postfail"] and "oops" in why["postfail"]
        assert f"still running after {TIMEOUT:g} s, killed" in levels["raksha-ac-hung"][1]
        assert f"no pre-freeze hook at {DEFAULT_PRE_FREEZE}" in levels["raksha-ac-plain"][1]
        assert "no freeze" in levels["raksha-ac-bare"][1]
        assert all(vm.error is None and vm.disks for vm in result.vms), strategy
        # The hung hook is bounded by the timeout, and its time is outside the freeze window.
        assert TIMEOUT * 1000 <= result.pre_freeze_ms < TIMEOUT * 1000 + 10_000, result.pre_freeze_ms
        assert result.freeze_ms < TIMEOUT * 1000, result.freeze_ms
        assert walls[strategy] < 120
        print(f"{strategy}: freeze {result.freeze_ms:.0f} ms, pre-freeze hooks {result.pre_freeze_ms:.0f} ms, "
              f"post-thaw hooks {result.post_thaw_ms:.0f} ms, run {walls[strategy]:.1f} s; "
              f"app: {levels['raksha-ac-app'][1]}")
    assert {vm.name: vm.consistency for vm in fs_only.vms}["raksha-ac-app"] == FILESYSTEM
    assert fs_only.pre_freeze_ms == 0 and all(vm.why.startswith("filesystem consistency wanted: no guest hooks run")
                                              and "hook ran" not in vm.why for vm in fs_only.vms)
    assert set(frozen) == {"thawed"} and leftovers.strip() == b"0"

    # The pre-freeze line of each run is inside its point in time; the post-thaw line came after it.
    phases = [line.split()[0] for line in live_log.decode().splitlines()]
    assert phases == ["freeze", "thaw"] * 2  # the argument each got, as qemu-ga's fsfreeze-hook gets
    for i, strategy in enumerate(("pull", "snapshot")):
        out = tmp_path / f"{strategy}.raw"
        restore_backup(vault, BackupId.parse(f"ac-{strategy}/r1/{uuid_app}/vda"), str(out))
        assert debugfs_cat(out, "/hooks.log").decode().splitlines() == live_log.decode().splitlines()[:2 * i + 1]


def test_a_guest_whose_agent_hangs_is_not_frozen_and_does_not_hold_the_window(conn: libvirt.virConnect,
                                                                              tmp_path: Path) -> None:
    """The agent of ``stuck`` is stopped (SIGSTOP) after it answered once: its pre-freeze hook gets no answer
    within the agent timeout, so it is not frozen (``crash``, and why) and the others' window does not wait
    for a freeze that would time out too."""
    guest = build_guest()
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    with GuestDomain(conn, guest, [(make_data_disk(tmp_path / "app.raw", "24M", fmt="raw"), "raw")], tmp_path,
                     name="raksha-ac2-app") as app, \
            GuestDomain(conn, guest, [(make_data_disk(tmp_path / "stuck.raw", "24M", fmt="raw"), "raw")], tmp_path,
                        name="raksha-ac2-stuck") as stuck:
        for g in (app, stuck):
            g.wait_for_agent()
        install(app, HOOKS["app"])
        install(stuck, HOOKS["app"])
        assert stuck.exec("(sleep 1; kill -STOP $(pidof qemu-ga)) >/dev/null 2>&1 &")[0] == 0
        time.sleep(2)
        t0 = time.monotonic()
        result = backup_domains(conn, ["raksha-ac2-app", "raksha-ac2-stuck"], vault, "ac2", "r1",
                                hooks=Hooks(timeout=TIMEOUT))
        wall = time.monotonic() - t0
        assert app.agent("guest-fsfreeze-status") == "thawed"
    levels = by_name(result)
    assert levels["raksha-ac2-app"][0] == APPLICATION, levels
    assert levels["raksha-ac2-stuck"][0] == CRASH and "did not answer the pre-freeze hook" in levels[
        "raksha-ac2-stuck"][1], levels
    assert all(vm.error is None and vm.disks for vm in result.vms)
    assert result.freeze_ms < TIMEOUT * 1000, result.freeze_ms  # a freeze of stuck would hold it >= 10 s
    print(f"stuck agent: freeze {result.freeze_ms:.0f} ms, pre-freeze hooks {result.pre_freeze_ms:.0f} ms, "
          f"run {wall:.1f} s; stuck: {levels['raksha-ac2-stuck'][1]}")


def test_a_run_that_fails_beside_the_pre_freeze_hooks_has_them_undone(conn: libvirt.virConnect, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-freeze hooks run while the run is planned. When the planning fails with an error of Raksha's
    own, the run fails before any guest is frozen, and the post-thaw hooks undo what the pre-freeze ones did."""
    from raksha.hypervisor import pull

    def broken(_p: object) -> None:
        time.sleep(1.0)  # the hook has run by now: it is undone, not skipped
        raise RuntimeError("planning broke")

    monkeypatch.setattr(pull, "_plan_disks", broken)
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    with GuestDomain(conn, build_guest(), [(make_data_disk(tmp_path / "app.raw", "24M", fmt="raw"), "raw")],
                     tmp_path, name="raksha-ac3-app") as app:
        app.wait_for_agent()
        install(app, HOOKS["app"])
        with pytest.raises(RuntimeError, match="planning broke"):
            backup_domains(conn, ["raksha-ac3-app"], vault, "ac3", "r1", hooks=Hooks(timeout=TIMEOUT))
        _, log = app.exec("cat /mnt/vda/hooks.log")
        assert app.agent("guest-fsfreeze-status") == "thawed"
    assert [line.split()[0] for line in log.decode().splitlines()] == ["freeze", "thaw"]
    assert not vault.backup_ids()
