"""Run a command and measure its own peak RSS, whatever the size of the process that runs it.

``os.wait4`` reports a child's ``ru_maxrss`` from the moment it was forked, before it exec'd: a child of
a 300 MB process "peaks" at 300 MB even as /bin/true. A benchmark that builds a large vault or holds
large lists in its own process would read its own size instead of the tool's. So the command is
started by a small launcher (a bare interpreter, ~10 MB, less than any tool measured here), whose
wait4 sees the command alone, and which reports the figure on a pipe of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

_LAUNCHER = """
import os, sys
fd = int(sys.argv[1])
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
os.write(fd, b"%d %d" % (usage.ru_maxrss, os.waitstatus_to_exitcode(status)))
"""


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int, bytes, bytes]:
    """(wall seconds, peak RSS in bytes, exit code, stdout, stderr) of ``argv``; stdin is /dev/null."""
    read_end, write_end = os.pipe()
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(write_end), *argv], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, pass_fds=(write_end,), check=False)
    finally:
        os.close(write_end)
    seconds = time.perf_counter() - start
    with os.fdopen(read_end, "rb") as f:
        report = f.read().split()
    if proc.returncode != 0 or len(report) != 2:
        return seconds, 0, proc.returncode or 1, proc.stdout, proc.stderr
    return seconds, int(report[0]) * 1024, int(report[1]), proc.stdout, proc.stderr
