"""The levels the guest hooks lead to (strategy.Hooks, HookRun); the hooks themselves run on real guests in
tests/functional/test_application_consistency.py."""

from __future__ import annotations

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from raksha.hypervisor.strategy import (
    APPLICATION,
    CRASH,
    FILESYSTEM,
    LEVELS,
    HookRun,
    Hooks,
)
from raksha.services.views import CONSISTENCY_ORDER, weakest


def test_hooks_run_only_when_application_is_wanted() -> None:
    custom = Hooks(pre_freeze="/opt/app/quiesce", post_thaw=None, timeout=5)
    assert Hooks.for_level(None) == Hooks()
    assert Hooks.for_level(APPLICATION, custom) is custom
    assert Hooks.for_level(FILESYSTEM, custom) is None and Hooks.for_level(CRASH) is None
    assert Hooks().timeout == 60 and Hooks().pre_freeze == "/etc/raksha/hooks/pre-freeze"


def test_application_needs_the_freeze_and_a_good_pre_freeze_hook() -> None:
    hooked, other = object(), object()
    run = HookRun(ok=[hooked], started=[hooked, other])
    assert run.reached(hooked, FILESYSTEM) == APPLICATION
    assert run.reached(hooked, CRASH) == CRASH  # the hook ran but the freeze failed
    assert run.reached(other, FILESYSTEM) == FILESYSTEM  # started but failed or timed out
    assert list(LEVELS) == CONSISTENCY_ORDER
    assert weakest([APPLICATION, FILESYSTEM, APPLICATION]) == FILESYSTEM


def test_an_unknown_wanted_level_is_refused() -> None:
    from raksha.domain.errors import InvalidInput
    from raksha.hypervisor.group_backup import backup_domains

    with pytest.raises(InvalidInput) as err:
        backup_domains(None, [], None, "job", "run", consistency="app")  # type: ignore[arg-type]
    assert err.value.code == "INVALID_CONSISTENCY"


class _Agent:
    """The guest agent at its one seam (libvirt_qemu.qemuAgentCommand): a guest holding ``files``."""

    def __init__(self, files: set[str], refuse_open: str = "") -> None:
        self.files, self.refuse_open, self.calls = files, refuse_open, []  # type: list[str]

    def __call__(self, _dom: object, cmd: str, _timeout: int, _flags: int) -> str:
        import json

        import libvirt

        c = json.loads(cmd)
        name, args = c["execute"], c.get("arguments", {})
        self.calls.append(name)
        missing = libvirt.libvirtError(f"failed to open file '{args.get('path')}': No such file or directory")
        missing.err = (1, 0, missing.args[0], 0, "", None, None, 0, 0)  # what get_error_message() reads
        if name == "guest-file-open":
            if self.refuse_open:
                err = libvirt.libvirtError(self.refuse_open)
                err.err = (1, 0, self.refuse_open, 0, "", None, None, 0, 0)
                raise err
            if args["path"] not in self.files:
                raise missing
            return json.dumps({"return": 7})
        if name == "guest-file-close":
            return json.dumps({"return": {}})
        if name == "guest-exec":
            if args["path"] not in self.files:
                raise missing
            return json.dumps({"return": {"pid": 42}})
        assert name == "guest-exec-status"
        return json.dumps({"return": {"exited": True, "exitcode": 0}})


@pytest.mark.parametrize(("files", "refuse", "calls", "outcome"), [
    # No hook: one open(2) in the agent answers, and nothing is forked to find out.
    (set(), "", ["guest-file-open"], "missing"),
    # A hook: looked at, then run.
    ({"/etc/raksha/hooks/pre-freeze"}, "", ["guest-file-open", "guest-file-close", "guest-exec", "guest-exec-status"],
     "ok"),
    # An agent that refuses the look (blocked command): guest-exec decides.
    (set(), "Command guest-file-open has been disabled", ["guest-file-open", "guest-exec"], "missing"),
])
def test_a_missing_hook_is_found_without_running_anything(monkeypatch: pytest.MonkeyPatch, files: set[str],
                                                          refuse: str, calls: list[str], outcome: str) -> None:
    import libvirt_qemu

    from raksha.hypervisor import strategy

    agent = _Agent(files, refuse)
    monkeypatch.setattr(libvirt_qemu, "qemuAgentCommand", agent)

    class Guest:
        domain, why = object(), ""

    guest = Guest()
    assert strategy._run_hook(guest, "/etc/raksha/hooks/pre-freeze", "pre-freeze", "freeze", 5) == outcome
    assert agent.calls == calls
    assert ("no pre-freeze hook at" in guest.why) == (outcome == "missing")


def test_a_hook_named_without_a_path_is_looked_up_by_guest_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    import libvirt_qemu

    from raksha.hypervisor.strategy import guest_file_missing

    agent = _Agent(set())
    monkeypatch.setattr(libvirt_qemu, "qemuAgentCommand", agent)
    assert guest_file_missing(object(), "quiesce") is False and agent.calls == []  # type: ignore[arg-type]
