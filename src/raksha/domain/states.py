"""The life cycles of runs, their VMs and disks, disk backups and restores, as explicit tables. Pure, no I/O.

Each machine is a :class:`StateMachine`: its states, the transitions allowed out of
each (data, not code), which states are *terminal* (no work in progress: a worker
never moves them again on its own) and which are *final* (nothing moves them ever).
Status is changed only through :meth:`StateMachine.check`, which raises
:class:`~raksha.domain.errors.InvalidStateTransition` (code ``INVALID_STATE_TRANSITION``)
on a move the table does not allow. The database layer applies a checked move with
a compare-and-set on the old status, so two workers cannot both move one run.

A run (``backupjobrun``)::

    queued -> snapshotting -> uploading -> available | partial | error
       |            |              |
       +------------+--------------+--> cancelling -> cancelled   (queued may go straight to cancelled)
    available | partial | error | cancelled -> deleting -> deleted

A VM of a run and a disk (``backupjobrun_vm_resource``) of that VM::

    queued -> snapshotting -> uploading -> available
    any of the three -> error | cancelled

A restore::

    queued -> restoring -> available | error;  queued | restoring -> cancelling -> cancelled

The run's outcome is derived from its VMs' (:func:`run_outcome`): every VM available
-> ``available``; some available and the rest failed -> ``partial`` (restorable: the
VMs that made it are complete and consistent among themselves); none available ->
``error``; a cancel that left any VM unfinished -> ``cancelled``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from raksha.domain.errors import InvalidStateTransition


class RunStatus(StrEnum):
    QUEUED = "queued"
    SNAPSHOTTING = "snapshotting"
    UPLOADING = "uploading"
    AVAILABLE = "available"
    PARTIAL = "partial"  # some VMs available, the others failed
    ERROR = "error"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    DELETING = "deleting"
    DELETED = "deleted"


class VmStatus(StrEnum):
    """Status of one VM of a run, and of one disk of that VM (the same life cycle)."""

    QUEUED = "queued"
    SNAPSHOTTING = "snapshotting"
    UPLOADING = "uploading"
    AVAILABLE = "available"
    ERROR = "error"
    CANCELLED = "cancelled"


class BackupStatus(StrEnum):
    """Status of a ``vm_resource_backups`` row: one disk's data in the vault (the 2013 code starts at ``creating``)."""

    CREATING = "creating"
    AVAILABLE = "available"
    ERROR = "error"
    DELETING = "deleting"
    DELETED = "deleted"


class VerifyState(StrEnum):
    """What the service's scheduled verification says of a run's data (``backupjobruns.verify_state``; NULL:
    not every pack it uses was read since it was finished). raksha.domain.verify_coverage says when."""

    OK = "ok"  # every chunk it uses re-read and re-hashed since it was finished, none damaged
    DAMAGED = "damaged"  # a pass found a chunk of it damaged or missing: its restore would fail


class RestoreStatus(StrEnum):
    QUEUED = "queued"
    RESTORING = "restoring"
    AVAILABLE = "available"
    ERROR = "error"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class JobStatus(StrEnum):
    """A backup job itself; whether it is running is told by its runs, not by this."""

    AVAILABLE = "available"
    DELETING = "deleting"
    DELETED = "deleted"


class RunType(StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"


class RestoreType(StrEnum):
    NEW_VM = "new_vm"
    FILES = "files"
    IN_PLACE = "in_place"


class Consistency(StrEnum):
    """A consistency level, weakest first: what a job wants (``backupjobs.consistency``; none: the best each VM
    reaches) and what a VM of a run reached."""

    CRASH = "crash"  # not frozen
    FILESYSTEM = "filesystem"  # frozen, no guest hooks
    APPLICATION = "application"  # the guest's hooks around the freeze


@dataclass(frozen=True)
class StateMachine:
    """A named table of allowed transitions. ``terminal``: no work in progress; ``final``: never leaves."""

    name: str
    initial: str
    transitions: Mapping[str, frozenset[str]]
    terminal: frozenset[str]

    @property
    def states(self) -> frozenset[str]:
        return frozenset(self.transitions)

    @property
    def final(self) -> frozenset[str]:
        return frozenset(s for s, out in self.transitions.items() if not out)

    @property
    def active(self) -> frozenset[str]:
        """States in which work is in progress (the complement of ``terminal``)."""
        return self.states - self.terminal

    def can(self, current: str, new: str) -> bool:
        return new in self.transitions.get(current, frozenset())

    def is_terminal(self, status: str) -> bool:
        return status in self.terminal

    def check(self, current: str, new: str, *, resource_id: str | None = None) -> str:
        """Return ``new`` if ``current -> new`` is allowed, else raise ``InvalidStateTransition``."""
        if current not in self.transitions:
            raise InvalidStateTransition(f"{self.name} is in an unknown status {current!r}",
                                         resource=self.name, id=resource_id, status=current)
        if new not in self.transitions:
            raise InvalidStateTransition(
                f"{new!r} is not a status of a {self.name}; statuses: {', '.join(sorted(self.transitions))}",
                resource=self.name, id=resource_id, status=current, requested=new)
        if not self.can(current, new):
            allowed = ", ".join(sorted(self.transitions[current])) or "none"
            raise InvalidStateTransition(
                f"a {self.name} that is {current} cannot become {new} (from {current}: {allowed})",
                resource=self.name, id=resource_id, status=current, requested=new)
        return new


def _table(pairs: dict[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    return {state: frozenset(out) for state, out in pairs.items()}


R = RunStatus
RUN = StateMachine(
    name="backupjobrun",
    initial=R.QUEUED,
    transitions=_table({
        R.QUEUED: (R.SNAPSHOTTING, R.ERROR, R.CANCELLING, R.CANCELLED),
        R.SNAPSHOTTING: (R.UPLOADING, R.ERROR, R.CANCELLING),
        R.UPLOADING: (R.AVAILABLE, R.PARTIAL, R.ERROR, R.CANCELLING),
        # A cancel that arrives after the work finished ends the way the work did.
        R.CANCELLING: (R.CANCELLED, R.AVAILABLE, R.PARTIAL, R.ERROR),
        R.AVAILABLE: (R.DELETING,),
        R.PARTIAL: (R.DELETING,),
        R.ERROR: (R.DELETING,),
        R.CANCELLED: (R.DELETING,),
        # A deletion that fails stays ``deleting``; the next attempt resumes it.
        R.DELETING: (R.DELETED,),
        R.DELETED: (),
    }),
    terminal=frozenset({R.AVAILABLE, R.PARTIAL, R.ERROR, R.CANCELLED, R.DELETED}),
)

V = VmStatus
_VM_TABLE = _table({
    V.QUEUED: (V.SNAPSHOTTING, V.ERROR, V.CANCELLED),
    V.SNAPSHOTTING: (V.UPLOADING, V.ERROR, V.CANCELLED),
    V.UPLOADING: (V.AVAILABLE, V.ERROR, V.CANCELLED),
    V.AVAILABLE: (),
    V.ERROR: (),
    V.CANCELLED: (),
})
_VM_TERMINAL = frozenset({V.AVAILABLE, V.ERROR, V.CANCELLED})
RUN_VM = StateMachine("backupjobrun_vm", V.QUEUED, _VM_TABLE, _VM_TERMINAL)
RUN_VM_RESOURCE = StateMachine("backupjobrun_vm_resource", V.QUEUED, _VM_TABLE, _VM_TERMINAL)

B = BackupStatus
VM_RESOURCE_BACKUP = StateMachine(
    name="vm_resource_backup",
    initial=B.CREATING,
    transitions=_table({
        B.CREATING: (B.AVAILABLE, B.ERROR),
        B.AVAILABLE: (B.DELETING,),
        B.ERROR: (B.DELETING,),
        B.DELETING: (B.DELETED,),
        B.DELETED: (),
    }),
    terminal=frozenset({B.AVAILABLE, B.ERROR, B.DELETED}),
)

S = RestoreStatus
RESTORE = StateMachine(
    name="restore",
    initial=S.QUEUED,
    transitions=_table({
        S.QUEUED: (S.RESTORING, S.ERROR, S.CANCELLING, S.CANCELLED),
        S.RESTORING: (S.AVAILABLE, S.ERROR, S.CANCELLING),
        S.CANCELLING: (S.CANCELLED, S.AVAILABLE, S.ERROR),
        S.AVAILABLE: (),
        S.ERROR: (),
        S.CANCELLED: (),
    }),
    terminal=frozenset({S.AVAILABLE, S.ERROR, S.CANCELLED}),
)

J = JobStatus
JOB = StateMachine(
    name="backupjob",
    initial=J.AVAILABLE,
    transitions=_table({J.AVAILABLE: (J.DELETING, J.DELETED), J.DELETING: (J.DELETED,), J.DELETED: ()}),
    terminal=frozenset({J.AVAILABLE, J.DELETED}),
)

#: Runs a restore may be taken from: every VM of an ``available`` run, the available VMs of a ``partial`` one.
RESTORABLE_RUN_STATUSES = frozenset({R.AVAILABLE, R.PARTIAL})

#: Runs an incremental may build on (its disks' backups become the new backups' backing).
PARENT_RUN_STATUSES = frozenset({R.AVAILABLE, R.PARTIAL})


def run_outcome(vm_statuses: Iterable[str]) -> RunStatus:
    """The terminal status of a run whose VMs have all finished.

    >>> run_outcome(["available", "available"])
    <RunStatus.AVAILABLE: 'available'>
    >>> run_outcome(["available", "error"])
    <RunStatus.PARTIAL: 'partial'>
    >>> run_outcome(["error", "error"])
    <RunStatus.ERROR: 'error'>
    """
    statuses = list(vm_statuses)
    unfinished = [s for s in statuses if not RUN_VM.is_terminal(s)]
    if unfinished:
        raise InvalidStateTransition(
            f"a run cannot end while {len(unfinished)} of its VMs are still {', '.join(sorted(set(unfinished)))}",
            code="RUN_NOT_SETTLED", resource="backupjobrun", vm_statuses=sorted(set(statuses)))
    if not statuses:
        return RunStatus.ERROR  # nothing was protected
    if all(s == V.AVAILABLE for s in statuses):
        return RunStatus.AVAILABLE
    if V.CANCELLED in statuses:
        return RunStatus.CANCELLED
    if V.AVAILABLE in statuses:
        return RunStatus.PARTIAL
    return RunStatus.ERROR


def run_progress_status(vm_statuses: Iterable[str]) -> RunStatus:
    """The status a run shows while its VMs work: the least advanced stage any unfinished VM is in.

    Finished VMs do not hold the run back; once every VM has finished it is :func:`run_outcome`.
    """
    statuses = list(vm_statuses)
    unfinished = {s for s in statuses if not RUN_VM.is_terminal(s)}
    if not unfinished:
        return run_outcome(statuses)
    for stage, run_stage in ((V.QUEUED, R.QUEUED), (V.SNAPSHOTTING, R.SNAPSHOTTING)):
        if stage in unfinished:
            return run_stage
    return R.UPLOADING
