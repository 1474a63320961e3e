"""Whether the process that left something behind (a vault lock, a staged pack, a pull job, a qemu-nbd
export) still runs.

A pid alone does not say so: once its owner died the number may be reused, soon in a new pid namespace
(a restarted container, a machine handed on). Cleaning up after a live process would break its work;
so the owner counts as alive only while a process with that pid runs and started no later than the
thing it left was made.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_SLACK = 2.0  # seconds: the boot time is whole seconds, a start time is in clock ticks


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; the command name before it may hold spaces."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return text[text.rfind(")") + 2 :].split()


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not: it holds no files)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if that cannot be told."""
    fields = _stat_fields(pid)
    boot = _boot_time()
    if fields is None or boot is None or len(fields) < 20:
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks


def owner_alive(pid: int, made: float) -> bool:
    """Whether the process ``pid`` that made something at ``made`` (seconds since the epoch) still runs:
    a process with that pid that started after it is another one that got the number."""
    if pid <= 0 or not alive(pid):
        return False
    start = started_at(pid)
    return start is None or start <= made + _SLACK


def remove_dirs_of_dead_owners(base: str, name: re.Pattern[str]) -> None:
    """Remove the directories in ``base`` whose names ``name`` matches with the pid of their owner (group 1),
    where that owner no longer runs (SIGKILL, a crash): what they held is nobody's any more."""
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        owner = name.match(entry.name)
        if owner is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            made = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if not owner_alive(int(owner.group(1)), made):
            shutil.rmtree(entry.path, ignore_errors=True)
