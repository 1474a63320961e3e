"""What a backup strategy hands to the per-disk loop of ``group_backup``, and the guest freeze they share.

A strategy is a context manager that takes one point in time over several domains and yields a
``GroupPoint``: per domain, the disks to read, how each one's changes are found (``plan``), a
source for each, and the consistency level reached. The loop reads every disk into the vault and
reports a domain it could not back up with ``fail``. Leaving the context ends the run: the
domains that completed keep what the next incremental needs, the failed ones keep their previous
base. ``pull`` (libvirt checkpoints, pull.py) and ``snapshot`` (external snapshots, snapshot.py)
have this shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import libvirt
import libvirt_qemu

from raksha.domain.errors import RakshaError
from raksha.hypervisor.disks import DiskInfo
from raksha.vault.sources.base import Extent
from raksha.vault.sources.nbd import NbdSource

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

    def changed_extents(self, disk: DiskInfo, source: NbdSource) -> list[Extent]: ...

    def fail(self, error: RakshaError) -> None: ...


class GroupPoint(Protocol):
    @property
    def domains(self) -> Sequence[DomainPoint]: ...

    @property
    def freeze_ms(self) -> float: ...


class Freezable(Protocol):
    domain: libvirt.virDomain
    why: str


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not: it holds no files)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split(" ", 1)[0] != "Z"


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
    with ThreadPoolExecutor(max_workers=min(len(items), 16)) as pool:
        return list(pool.map(run, items))


def thaw_leftovers(points: Sequence[Freezable], timeout: int = 10) -> None:
    """Thaw a guest found frozen (by a run that died inside its window): never ours to keep."""
    def one(p: Freezable) -> None:
        if agent(p.domain, "guest-fsfreeze-status", timeout) == "frozen":
            agent(p.domain, "guest-fsfreeze-thaw", timeout)
            p.why += "found frozen by an interrupted run; thawed first. "

    each(one, points)  # no agent: nothing to thaw, and the freeze says why


def freeze_guests(points: Sequence[Freezable], timeout: int = 10) -> list[Freezable]:
    """Freeze every guest whose agent answers within ``timeout`` s, all at once; return those frozen.

    The others say why. A freeze that failed or timed out is followed by a thaw, as the agent may
    still carry it out.
    """
    def one(p: Freezable) -> None:
        try:
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
