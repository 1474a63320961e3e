"""What a backup strategy hands to the per-disk loop of ``group_backup``, and the guest freeze they share.

A strategy is a context manager that takes one point in time over several domains and yields a
``GroupPoint``: per domain, the disks to read, how each one's changes are found (``plan``), a
source for each, and the consistency level reached. The loop reads every disk into the vault and
reports a domain it could not back up with ``fail``. Leaving the context ends the run: the
domains that completed keep what the next incremental needs, the failed ones keep their previous
base. ``pull`` (libvirt checkpoints, pull.py) and ``snapshot`` (external snapshots, snapshot.py)
have this shape.

Both freeze the same way (the helpers below): every guest's pre-freeze hook at once (``pre_freeze``),
then the window: freeze all, take the point, thaw all; then every post-thaw hook (``post_thaw``). A
guest frozen after its pre-freeze hook exited 0 reaches ``application``, frozen alone ``filesystem``,
else ``crash`` (docs/adr/0008-application-consistency.md).
"""

from __future__ import annotations

import base64
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import libvirt
import libvirt_qemu

from raksha.domain.errors import RakshaError
from raksha.hypervisor.disks import DiskInfo
from raksha.vault.sources.base import Extent
from raksha.vault.sources.nbd import NbdSource
from raksha.vault.threads import spawn

STRATEGIES = ("pull", "snapshot")
T = TypeVar("T")


class DiskPlan(Protocol):
    """How one disk's changes are found in a run."""

    @property
    def method(self) -> str: ...  # how changes are tracked: libvirt-checkpoint, snapshot-overlay, none, ...

    @property
    def incremental(self) -> bool: ...  # changes since the parent run are known

    @property
    def note(self) -> str: ...  # the "tracking" hint: how the disk was read, and why


class DomainPoint(Protocol):
    @property
    def domain(self) -> libvirt.virDomain: ...

    @property
    def disks(self) -> Sequence[DiskInfo]: ...

    @property
    def excluded(self) -> Sequence[DiskInfo]: ...

    @property
    def consistency(self) -> str: ...

    @property
    def why(self) -> str: ...

    @property
    def error(self) -> RakshaError | None: ...

    def plan(self, disk: DiskInfo) -> DiskPlan: ...

    def source(self, disk: DiskInfo) -> NbdSource: ...

    def changed_extents(self, disk: DiskInfo, source: NbdSource) -> Sequence[Extent]: ...

    def backing_chain(self, disk: DiskInfo) -> list[dict[str, str]]: ...  # the image, then its backing files

    def definition(self) -> str: ...  # the domain's inactive XML (secure): enough to define it again

    def reads_done(self) -> None: ...  # every disk of the domain is read; the vault commits next

    def fail(self, error: RakshaError) -> None: ...


class GroupPoint(Protocol):
    @property
    def domains(self) -> Sequence[DomainPoint]: ...

    @property
    def freeze_ms(self) -> float: ...

    @property
    def hooks(self) -> HookRun: ...

    @property
    def cleanup_errors(self) -> list[str]: ...  # "<domain>:<disk>: ..." what closing the group left undone


class Freezable(Protocol):
    domain: libvirt.virDomain
    why: str


def agent(dom: libvirt.virDomain, command: str, timeout: int = 10) -> Any:
    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": command}), timeout, 0)
    return json.loads(reply)["return"]


def each(fn: Callable[[T], object], items: Sequence[T]) -> list[BaseException | None]:
    """``fn`` on every item at once (one thread each: libvirt calls wait on QEMU and the guests, not the CPU);
    per item, the exception it raised or None."""
    def run(item: T) -> BaseException | None:
        try:
            fn(item)
        except Exception as exc:
            return exc
        return None

    if len(items) <= 1:
        return [run(item) for item in items]
    running = [spawn(functools.partial(run, item), name="raksha-each") for item in items]
    return [f.result() for f in running]


def thawed_leftover(p: Freezable, exc: libvirt.libvirtError, timeout: int = 10) -> bool:
    """After the agent refused a command as disabled: whether ``p`` was found frozen (by a run that died
    inside its window; never ours to keep) and thawed, so that the command can be tried again.

    Asked only then, not before every run: a frozen agent refuses every command but a few ("Command X has
    been disabled: the agent is in frozen state"), and a status call per guest is an agent round trip on
    every run for a case that only a killed run leaves."""
    if "has been disabled" not in (exc.get_error_message() or ""):
        return False
    try:
        if agent(p.domain, "guest-fsfreeze-status", timeout) != "frozen":
            return False  # disabled by the guest's own configuration: the error stands
        agent(p.domain, "guest-fsfreeze-thaw", timeout)
    except libvirt.libvirtError:
        return False
    p.why += "found frozen by an interrupted run; thawed first. "
    return True


def freeze_guests(points: Sequence[Freezable], timeout: int = 10) -> list[Freezable]:
    """Freeze every guest whose agent answers within ``timeout`` s, all at once; return those frozen.

    The others say why. A freeze that failed or timed out is followed by a thaw, as the agent may
    still carry it out.
    """
    def one(p: Freezable) -> None:
        try:
            try:
                agent(p.domain, "guest-fsfreeze-freeze", timeout)
            except libvirt.libvirtError as exc:
                if not thawed_leftover(p, exc, timeout):
                    raise
                agent(p.domain, "guest-fsfreeze-freeze", timeout)
        except libvirt.libvirtError as exc:
            p.why += f"no freeze: {exc.get_error_message()}"
            try:
                agent(p.domain, "guest-fsfreeze-thaw", timeout)
            except libvirt.libvirtError:
                pass  # no agent, or not frozen
            raise

    return [p for p, err in zip(points, each(one, points), strict=True) if err is None]


def thaw_guests(frozen: Sequence[Freezable], timeout: int = 10, attempts: int = 3) -> list[Freezable]:
    """Thaw every guest in ``frozen``, all at once (each is tried whatever the others do, ``attempts`` times);
    return those thawed."""
    def one(p: Freezable) -> None:
        for attempt in range(attempts):
            try:
                agent(p.domain, "guest-fsfreeze-thaw", timeout)
                return
            except libvirt.libvirtError as exc:
                if attempt == attempts - 1:
                    p.why += f"thaw failed: {exc.get_error_message()}"
                    raise

    return [p for p, err in zip(frozen, each(one, frozen), strict=True) if err is None]


# ---------------------------------------------------------------- application consistency: guest hooks
CRASH, FILESYSTEM, APPLICATION = "crash", "filesystem", "application"
LEVELS = (CRASH, FILESYSTEM, APPLICATION)  # weakest first
DEFAULT_PRE_FREEZE = "/etc/raksha/hooks/pre-freeze"
DEFAULT_POST_THAW = "/etc/raksha/hooks/post-thaw"
HOOK_POLL_S = 0.05


@dataclass(frozen=True)
class Hooks:
    """The guest scripts run around the freeze (docs/adr/0008-application-consistency.md).

    Each is run through the guest agent (``guest-exec``, no shell) with one argument, ``freeze`` or ``thaw``
    as qemu-ga passes to its own fsfreeze-hook (so one script can serve as both, and an existing
    fsfreeze-hook script can be named here), and killed after ``timeout`` s. ``None`` for a path: not run.
    """

    pre_freeze: str | None = DEFAULT_PRE_FREEZE
    post_thaw: str | None = DEFAULT_POST_THAW
    timeout: float = 60.0

    @classmethod
    def for_level(cls, wanted: str | None, hooks: Hooks | None = None) -> Hooks | None:
        """The hooks a run that wants ``wanted`` runs: none below ``application``."""
        if wanted in (CRASH, FILESYSTEM):
            return None
        return hooks or cls()


@dataclass
class HookRun:
    """What the hooks did in one run: which guests' pre-freeze hook exited 0, which were started at all
    (their post-thaw hook runs, to undo whatever the pre-freeze hook did), and the time each phase took."""

    ok: list[Any] = field(default_factory=list)
    started: list[Any] = field(default_factory=list)
    unresponsive: list[Any] = field(default_factory=list)  # their agent did not answer: not frozen either
    pre_freeze_ms: float = 0.0
    post_thaw_ms: float = 0.0

    def reached(self, p: object, level: str) -> str:
        """``p``'s level: ``application`` when it was frozen (``filesystem``) and its pre-freeze hook exited 0."""
        return APPLICATION if level == FILESYSTEM and any(p is q for q in self.ok) else level

    def to_freeze(self, points: Sequence[T]) -> list[T]:
        """``points`` but those whose agent did not answer the hook: a freeze would hold the whole group's
        window open for the agent timeout, and fail."""
        return [p for p in points if not any(p is q for q in self.unresponsive)]


class HookMissing(Exception):
    """The hook is not in the guest."""


def guest_exec(dom: libvirt.virDomain, path: str, args: Sequence[str], timeout: float) -> tuple[int, str]:
    """Run ``path args`` in the guest through its agent and wait up to ``timeout`` s; return (exit code, the
    end of its stderr). A process still running then is killed (``kill -KILL <pid>`` in the guest) and
    ``TimeoutError`` raised; ``HookMissing`` if there is no such file; ``libvirt.libvirtError`` if the
    agent does not answer or cannot start it."""
    cmd = {"execute": "guest-exec", "arguments": {"path": path, "arg": list(args), "capture-output": True}}
    try:
        reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), 10, 0)
    except libvirt.libvirtError as exc:
        if "No such file or directory" in (exc.get_error_message() or ""):
            raise HookMissing(path) from None
        raise
    pid = json.loads(reply)["return"]["pid"]
    deadline = time.monotonic() + timeout
    status = {"pid": pid}
    while True:
        st = json.loads(libvirt_qemu.qemuAgentCommand(
            dom, json.dumps({"execute": "guest-exec-status", "arguments": status}), 10, 0))["return"]
        if st.get("exited"):
            err = base64.b64decode(st.get("err-data", "")).decode(errors="replace").strip()
            code = st["exitcode"] if "exitcode" in st else 128 + int(st.get("signal", 0))
            return int(code), err[-300:]
        if time.monotonic() > deadline:
            _kill(dom, pid)
            raise TimeoutError(f"still running after {timeout:g} s, killed")
        time.sleep(HOOK_POLL_S)


def guest_file_missing(dom: libvirt.virDomain, path: str) -> bool:
    """Whether the agent finds no file at ``path``: ``guest-file-open`` is an open(2) in the agent, where a
    ``guest-exec`` of a missing file forks first (TCG guest: 2-4 ms against 4-14 ms, on every run of a
    guest without a hook). False when it cannot tell: a bare name (``guest-exec`` looks it up in PATH), an
    agent that refuses the command (frozen, or it is blocked); ``guest-exec`` then says."""
    if not path.startswith("/"):
        return False
    cmd = {"execute": "guest-file-open", "arguments": {"path": path, "mode": "r"}}
    try:
        reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), 10, 0)
    except libvirt.libvirtError as exc:
        return "No such file or directory" in (exc.get_error_message() or "")
    try:
        handle = json.loads(reply)["return"]
        libvirt_qemu.qemuAgentCommand(
            dom, json.dumps({"execute": "guest-file-close", "arguments": {"handle": handle}}), 10, 0)
    except (libvirt.libvirtError, KeyError, ValueError):
        pass  # the agent closes what it opened when it restarts; guest-exec runs the hook either way
    return False


def _kill(dom: libvirt.virDomain, pid: int) -> None:
    """Kill a guest-exec'd process and its children (a hook's ``sleep``, found in /proc: no pkill in busybox);
    plain ``kill`` where there is no sh."""
    children = (f"for s in /proc/[0-9]*/stat; do read -r c _ _ pp _ < $s 2>/dev/null; "
                f"[ \"$pp\" = {pid} ] && kill -KILL $c; done; kill -KILL {pid}")
    for path, args in (("/bin/sh", ["-c", children]), ("kill", ["-KILL", str(pid)])):
        cmd = {"execute": "guest-exec", "arguments": {"path": path, "arg": args}}
        try:
            libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), 10, 0)
            return
        except libvirt.libvirtError:
            continue  # no sh: plain kill; no agent: it is reaped when it ends


def _run_hook(p: Freezable, path: str, phase: str, arg: str, timeout: float) -> str:
    """Run one hook on ``p``: "ok", "missing", "unrunnable", "failed", "timeout" or "no-agent"; ``p.why`` says
    what happened."""
    t0 = time.monotonic()
    try:
        if guest_file_missing(p.domain, path):
            raise HookMissing(path)
        try:
            code, err = guest_exec(p.domain, path, [arg], timeout)
        except libvirt.libvirtError as exc:
            if not thawed_leftover(p, exc):
                raise
            code, err = guest_exec(p.domain, path, [arg], timeout)
    except HookMissing:
        p.why += f"no {phase} hook at {path}. "
        return "missing"
    except TimeoutError as exc:
        p.why += f"{phase} hook {path} {exc}. "
        return "timeout"
    except (KeyError, ValueError, TypeError) as exc:  # an agent reply without the fields guest-exec promises
        p.why += f"{phase} hook {path}: unexpected guest agent reply ({exc!r}). "
        return "failed"
    except libvirt.libvirtError as exc:
        msg = exc.get_error_message() or str(exc)
        if "Failed to execute" in msg or "Permission denied" in msg:  # there, but not runnable
            p.why += f"{phase} hook {path} could not run: {msg}. "
            return "unrunnable"
        if exc.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE and phase == "pre-freeze":
            p.why += f"no freeze: the guest agent did not answer the {phase} hook ({msg}). "
            return "unresponsive"
        return "no-agent"  # the freeze says why
    took = time.monotonic() - t0
    if code != 0:
        p.why += f"{phase} hook {path} exited {code} after {took:.1f} s" + (f": {err}" if err else "") + ". "
        return "failed"
    p.why += f"{phase} hook ran ({took:.1f} s). "
    return "ok"


def pre_freeze(points: Sequence[Freezable], hooks: Hooks | None) -> HookRun:
    """Each guest's pre-freeze hook, all at once, before the freeze window opens (each bounded by the timeout)."""
    run = HookRun()
    if hooks is None or hooks.pre_freeze is None or not points:
        return run
    path, t0 = hooks.pre_freeze, time.monotonic()
    outcomes: list[str] = [""] * len(points)

    def one(i: int) -> None:
        outcomes[i] = _run_hook(points[i], path, "pre-freeze", "freeze", hooks.timeout)

    each(one, list(range(len(points))))
    run.pre_freeze_ms = (time.monotonic() - t0) * 1000
    run.ok = [p for p, o in zip(points, outcomes, strict=True) if o == "ok"]
    run.started = [p for p, o in zip(points, outcomes, strict=True) if o in ("ok", "failed", "timeout")]
    run.unresponsive = [p for p, o in zip(points, outcomes, strict=True) if o == "unresponsive"]
    return run


def post_thaw(run: HookRun, hooks: Hooks | None) -> None:
    """The post-thaw hook of every guest whose pre-freeze hook was started, all at once, after the thaw.
    Its failure is recorded in ``why``; it does not lower the level (the point in time was taken)."""
    if hooks is None or hooks.post_thaw is None or not run.started:
        return
    path, t0 = hooks.post_thaw, time.monotonic()
    each(lambda p: _run_hook(p, path, "post-thaw", "thaw", hooks.timeout), run.started)
    run.post_thaw_ms = (time.monotonic() - t0) * 1000
