"""Benchmark Raksha against restic, borg and qemu-img on generated VM disk images.

Generates base.img, changed.img (+ changed.json extents) and clone.img with
bench/imagegen.py, then runs every tool through the same phases on the same
files, in the same order:

  full         back up base.img into a fresh repository / vault
  incremental  back up changed.img (Raksha: with --parent and --changed-extents;
               the peers have no changed-block input and read the whole image)
  restore      restore the full backup of base.img to a file and compare it
  clone        back up clone.img (a second VM cloned from the same base)

Raksha only, afterwards (bench/engine_driver.py): full_api and incremental_api, the same full and
incremental through the engine API in a process that has already opened the vault and run a backup
(untimed, of a small image into a scratch vault), as the long-running agent runs them: no interpreter
start, no key derivation per backup, the buffers of its earlier backups reused. The API
incremental runs on a hard-link copy of the vault taken right after the full, so it does the same
work as the CLI incremental; it runs 5 times a round from that same state (median). The incremental
target (<= 5% of the full) is judged for CLI/CLI and API/API separately.

Per phase: wall seconds, peak RSS of the tool process (os.wait4), repository
growth (disk usage = st_blocks * 512, and apparent size). Prints a table per
phase, Raksha-vs-peer ratios against the targets, and writes a JSON report.

Rounds (--rounds, default 3): the whole run (every tool, every phase, then the device floor) is
repeated on fresh repositories, the tools' order rotating so that none always goes first. A shared
disk's speed moves by 2x within minutes, so each ratio is taken within a round (the tools measured
minutes apart on the same disk) and the median of the rounds is reported, with their range; peak
memory is the largest of any round. Phase tables show each tool's median round.

    .venv/bin/python bench/run.py [--size 2G] [--tools raksha,restic,borg,qemu-img] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import device_floor
import imagegen

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RAKSHA_BIN = REPO_ROOT / ".venv" / "bin" / "raksha"
PASSWORD = "bench"
CHUNK_SIZE = 1 << 20  # Raksha's chunk size, for the incremental bytes_read allowance
MB = 1_000_000  # all MB and MB/s figures are decimal
ALL_TOOLS = ("raksha", "restic", "borg", "qemu-img")
PHASES = ("full", "incremental", "restore", "clone")
# Raksha only: the same full and incremental through the engine API in a process that has already opened
# the vault and run a backup (bench/engine_driver.py --warm-up), as the long-running agent runs them: no
# interpreter start, no key derivation per backup, its earlier backups' buffers reused. Timed from the call
# to its return + sync; cold cache as for every phase.
API_PHASES = ("full_api", "incremental_api")
# Raksha only: the full backup restored to a new qcow2 image (what the libvirt driver restores to by
# default), compared with base.img by `qemu-img compare`. No peer writes qcow2 (qemu-img's own restore
# is its convert to raw).
QCOW2_PHASE = "restore_qcow2"
# The API incremental (~60 ms) is timed this many times a round, each from the vault as the full left it,
# and the round takes their median: its run-to-run spread (+-10 ms) is a sixth of it.
API_INCREMENTAL_TRIALS = 5
LIST_PHASE = "list"  # one cheap command: what every command of the tool pays before its work
ENGINE_DRIVER = BENCH_DIR / "engine_driver.py"
WORKDIR_MARKER = ".raksha-bench-workdir"
COMPARE_BLOCK = 8 << 20

CACHE_NOTES = {
    "warm": "Inputs are page-cache warm for all tools: the images are generated (and read once) just before "
    "the runs, nothing is dropped from the page cache, and every tool runs the same phases in the "
    "same order on the same files. Dirty pages are flushed (sync, untimed) before every phase, so no "
    "tool pays for writeback of an earlier tool's or the generator's writes.",
    "cold": "Caches are cold for every tool and phase: before each phase dirty pages are flushed and the "
    "page cache is dropped (sync; echo 3 > /proc/sys/vm/drop_caches, untimed), so each backup reads its "
    "input from disk and each restore reads its repository from disk, as on a real host where neither the "
    "guest's disk nor last night's backup is in memory. Every tool runs the same phases in the same order "
    "on the same files.",
}
DROP_CACHES = Path("/proc/sys/vm/drop_caches")

DURABILITY_NOTE = (
    "Durability: every timed command is followed by a timed sync, so a backup or restore counts as done "
    "when its data is on disk. Raksha writes with O_DIRECT and fsyncs what it stores; tools that leave "
    "writes in the page cache pay for them here instead of after the benchmark."
)

NOTES = (
    DURABILITY_NOTE,
    "Encryption: every tool that supports it runs encrypted: Raksha --encrypt (AES-256-GCM), "
    "restic (always encrypted), borg repokey-blake2. qemu-img's qcow2 output is not encrypted.",
    "Incremental: Raksha gets --parent and --changed-extents. restic and borg back up changed.img "
    "again and must read all of it; qemu-img has no incremental mode, so it converts changed.img in full.",
    "Compression: Raksha zstd level 1 (vault default), restic auto (zstd, repository v2), "
    "borg zstd,3, qemu-img qcow2 -c (zlib).",
    "bytes = growth of the repository directory (sum of st_blocks * 512); apparent = sum of st_size. "
    "For restore: the restored file (restic 0.14 cannot restore sparse). MB = 10^6 bytes.",
)


# ---------------------------------------------------------------- results


@dataclass
class PhaseResult:
    ok: bool = False
    seconds: float | None = None
    bytes: int | None = None
    apparent_bytes: int | None = None
    peak_rss_bytes: int | None = None
    error: str | None = None
    verified: bool | None = None  # restore: restored file equals base.img
    bytes_read: int | None = None  # Raksha's own report, when it gives one
    report: dict[str, Any] | None = None  # the tool's JSON output, when it prints one
    seconds_rounds: list[float | None] = field(default_factory=list)  # every round's, when there were several


@dataclass
class ToolResult:
    name: str
    version: str | None = None
    error: str | None = None
    phases: dict[str, PhaseResult] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.error is None and all(self.phase_ok(p) for p in (*PHASES, *self.phases))

    def phase_ok(self, phase: str) -> bool:
        result = self.phases.get(phase)
        return result is not None and result.ok

    def seconds(self, phase: str) -> float | None:
        return self.phases[phase].seconds if self.phase_ok(phase) else None

    def bytes(self, phase: str) -> int | None:
        return self.phases[phase].bytes if self.phase_ok(phase) else None


@dataclass
class CommandResult:
    returncode: int
    seconds: float
    peak_rss_bytes: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Command:
    argv: list[str]
    cwd: Path | None = None


@dataclass(frozen=True)
class Input:
    """One image the tools back up, with the ids Raksha uses for it."""

    name: str
    path: Path
    raksha_id: str
    parent_id: str | None = None
    extents_json: Path | None = None


@dataclass
class Inputs:
    size: int
    seed: int
    base: Input
    changed: Input
    clone: Input
    changed_extents: list[list[int]]
    clone_extents: list[list[int]]
    generate_seconds: float

    @property
    def changed_bytes(self) -> int:
        return sum(length for _, length in self.changed_extents)


class PhaseError(Exception):
    pass


# ---------------------------------------------------------------- measuring


def run_measured(cmd: Command, env: dict[str, str], timeout: float) -> CommandResult:
    """Run ``cmd`` and return wall time and the child's peak RSS (``ru_maxrss``, KiB on Linux)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cmd.cwd)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, rusage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        os.sync()  # timed: work counts as done when its data is on disk (see DURABILITY_NOTE)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
        out.seek(0)
        err.seek(0)
        return CommandResult(
            returncode=proc.returncode,
            seconds=seconds,
            peak_rss_bytes=rusage.ru_maxrss * 1024,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


def checked(result: CommandResult, what: str) -> CommandResult:
    if result.returncode != 0:
        tail = (result.stderr.strip() or result.stdout.strip())[-800:]
        raise PhaseError(f"{what} exited with {result.returncode}: {tail}")
    return result


def disk_usage(path: Path) -> tuple[int, int]:
    """(disk bytes = sum st_blocks*512, apparent bytes = sum st_size) of a file or tree."""
    if not path.exists():
        return 0, 0
    if path.is_file():
        st = path.stat()
        return st.st_blocks * 512, st.st_size
    disk = apparent = 0
    seen: set[tuple[int, int]] = set()
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                disk += st.st_blocks * 512
                apparent += st.st_size
    return disk, apparent


def files_equal(a: Path, b: Path) -> bool:
    """Chunked byte comparison of two files."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb", buffering=0) as fa, b.open("rb", buffering=0) as fb:
        while True:
            block_a, block_b = fa.read(COMPARE_BLOCK), fb.read(COMPARE_BLOCK)
            if block_a != block_b:
                return False
            if not block_a:
                return True


def warm_page_cache(paths: list[Path]) -> None:
    """Read the allocated parts of each image once so every tool starts page-cache warm."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            for start, end in imagegen.data_segments(fd, os.fstat(fd).st_size):
                for offset in range(start, end, COMPARE_BLOCK):
                    os.pread(fd, min(COMPARE_BLOCK, end - offset), offset)
        finally:
            os.close(fd)


def find_key(data: Any, key: str) -> Any:
    """First value of ``key`` anywhere in nested dicts/lists, or None."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        data = list(data.values())
    if isinstance(data, list):
        for item in data:
            found = find_key(item, key)
            if found is not None:
                return found
    return None


def parse_json_output(stdout: str) -> dict[str, Any] | None:
    """The tool's JSON object on stdout (the whole text, else its last JSON line)."""
    candidates = [stdout, *reversed(stdout.strip().splitlines())]
    for text in candidates:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


# ---------------------------------------------------------------- tools


class Tool:
    """A backup tool driven through its CLI. Subclasses build the commands."""

    name = ""
    executable = ""

    def __init__(self, workdir: Path, timeout: float) -> None:
        self.root = workdir / self.name
        self.repo = self.root / "repo"
        self.timeout = timeout

    def missing(self) -> str | None:
        if shutil.which(self.executable) is None:
            return f"{self.executable} not found"
        return None

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def version(self) -> str:
        result = run_measured(Command([self.executable, "--version"]), self.env(), 60)
        return (result.stdout or result.stderr).strip().splitlines()[0]

    def report(self, stdout: str) -> dict[str, Any] | None:
        """The tool's machine-readable report, for tools that print one."""
        return None

    def run(self, cmd: Command, what: str) -> CommandResult:
        return checked(run_measured(cmd, self.env(), self.timeout), f"{self.name} {what}")

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def backup_command(self, image: Input) -> Command:
        raise NotImplementedError

    def restore_command(self, image: Input, target: Path) -> tuple[Command, Path]:
        """The timed restore command and where it leaves the restored image."""
        raise NotImplementedError

    def list_command(self) -> Command | None:
        """A command that lists the repository's backups (None: the tool has none)."""
        return None


class Raksha(Tool):
    name = "raksha"
    executable = str(RAKSHA_BIN)

    def __init__(self, workdir: Path, timeout: float) -> None:
        super().__init__(workdir, timeout)
        self.repo = self.root / "vault"

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAKSHA_PASSWORD": PASSWORD}

    def version(self) -> str:
        result = run_measured(Command([self.executable, "--version"]), self.env(), 60)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().splitlines()[0]
        return f"raksha {importlib.metadata.version('raksha')} (package metadata)"

    def report(self, stdout: str) -> dict[str, Any] | None:
        return parse_json_output(stdout)

    def init(self) -> None:
        super().init()
        self.run(Command([self.executable, "vault", "init", str(self.repo), "--encrypt", "--json"]), "init")

    def backup_command(self, image: Input) -> Command:
        argv = [self.executable, "vault", "backup", str(self.repo), str(image.path), "--id", image.raksha_id]
        if image.parent_id is not None:
            argv += ["--parent", image.parent_id]
        if image.extents_json is not None:
            argv += ["--changed-extents", str(image.extents_json)]
        return Command([*argv, "--json"])

    def restore_command(self, image: Input, target: Path, fmt: str = "raw") -> tuple[Command, Path]:
        out = target / (image.path.name if fmt == "raw" else f"{image.path.stem}.{fmt}")
        argv = [self.executable, "vault", "restore", str(self.repo), image.raksha_id, str(out), "--format", fmt,
                "--json"]
        return Command(argv), out

    def list_command(self) -> Command | None:
        return Command([self.executable, "vault", "list", str(self.repo), "--json"])

    @property
    def api_repo(self) -> Path:
        """The vault as it was right after the full: the API incremental does the CLI incremental's work."""
        return self.root / "vault-after-full"

    def snapshot_after_full(self) -> None:
        """Untimed: hard-link copy of the vault (objects are immutable; new ones land in one copy only)."""
        subprocess.run(["cp", "-al", str(self.repo), str(self.api_repo)], check=True)

    def api_command(self, phase: str, image: Input, cache: str, vault: Path | None = None) -> Command:
        """The engine driver's command for ``phase``; ``vault``: another copy of the API incremental's."""
        python = str(Path(self.executable).parent / "python")
        if phase == "full_api":
            vault, extra = self.root / "vault-api-full", ["--init"]
        else:
            vault, extra = vault or self.api_repo, []
        if image.parent_id is not None:
            extra += ["--parent", image.parent_id]
        if image.extents_json is not None:
            extra += ["--changed-extents", str(image.extents_json)]
        argv = [python, str(ENGINE_DRIVER), str(vault), str(image.path), "--id", image.raksha_id, "--cache", cache,
                "--warm-up"]  # as the agent: its earlier backups' buffers are there (engine_driver.py)
        return Command([*argv, *extra])


class Restic(Tool):
    name = "restic"
    executable = "restic"

    def env(self) -> dict[str, str]:
        return {**os.environ, "RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(self.root / "cache")}

    def version(self) -> str:
        result = run_measured(Command([self.executable, "version"]), self.env(), 60)
        return result.stdout.strip()

    def init(self) -> None:
        super().init()
        self.run(Command([self.executable, "init", "--repo", str(self.repo)]), "init")

    def backup_command(self, image: Input) -> Command:
        argv = [self.executable, "-r", str(self.repo), "backup", "--host", "bench", "--tag", image.name]
        return Command([*argv, str(image.path)])

    def list_command(self) -> Command | None:
        return Command([self.executable, "-r", str(self.repo), "snapshots", "--json"])

    def snapshot_id(self, image: Input) -> str:
        result = self.run(Command([self.executable, "-r", str(self.repo), "snapshots", "--json"]), "snapshots")
        for snapshot in json.loads(result.stdout):
            if image.name in (snapshot.get("tags") or []):
                return str(snapshot["id"])
        raise PhaseError(f"restic: no snapshot tagged {image.name}")

    def restore_command(self, image: Input, target: Path) -> tuple[Command, Path]:
        argv = [self.executable, "-r", str(self.repo), "restore", self.snapshot_id(image), "--target", str(target)]
        return Command(argv), target / image.path.relative_to("/")


class Borg(Tool):
    name = "borg"
    executable = "borg"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "BORG_PASSPHRASE": PASSWORD,
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_BASE_DIR": str(self.root / "home"),
        }

    def init(self) -> None:
        super().init()
        self.run(Command([self.executable, "init", "--encryption=repokey-blake2", str(self.repo)]), "init")

    def backup_command(self, image: Input) -> Command:
        archive = f"{self.repo}::{image.name}"
        return Command([self.executable, "create", "--compression", "zstd,3", archive, str(image.path)])

    def restore_command(self, image: Input, target: Path) -> tuple[Command, Path]:
        argv = [self.executable, "extract", "--sparse", f"{self.repo}::{image.name}"]
        return Command(argv, cwd=target), target / image.path.relative_to("/")

    def list_command(self) -> Command | None:
        return Command([self.executable, "list", str(self.repo)])


class QemuImg(Tool):
    name = "qemu-img"
    executable = "qemu-img"

    def init(self) -> None:
        self.repo.mkdir(parents=True, exist_ok=True)

    def backup_command(self, image: Input) -> Command:
        out = self.repo / f"{image.name}.qcow2"
        return Command([self.executable, "convert", "-O", "qcow2", "-c", str(image.path), str(out)])

    def restore_command(self, image: Input, target: Path) -> tuple[Command, Path]:
        out = target / image.path.name
        source = self.repo / f"{image.name}.qcow2"
        return Command([self.executable, "convert", "-O", "raw", str(source), str(out)]), out


TOOL_CLASSES: dict[str, type[Tool]] = {cls.name: cls for cls in (Raksha, Restic, Borg, QemuImg)}


# ---------------------------------------------------------------- phases


def backup_phase(tool: Tool, image: Input) -> PhaseResult:
    before_disk, before_apparent = disk_usage(tool.repo)
    result = tool.run(tool.backup_command(image), f"backup {image.path.name}")
    after_disk, after_apparent = disk_usage(tool.repo)
    report = tool.report(result.stdout)
    bytes_read = find_key(report, "bytes_read")
    return PhaseResult(
        ok=True,
        seconds=result.seconds,
        bytes=after_disk - before_disk,
        apparent_bytes=after_apparent - before_apparent,
        peak_rss_bytes=result.peak_rss_bytes,
        bytes_read=int(bytes_read) if isinstance(bytes_read, int | float) else None,
        report=report,
    )


def restore_phase(tool: Tool, image: Input, fmt: str = "raw") -> PhaseResult:
    target = tool.root / "restore"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    try:
        if fmt == "raw":
            cmd, restored = tool.restore_command(image, target)  # may run untimed lookups first
        else:  # only Raksha writes another format
            assert isinstance(tool, Raksha)
            cmd, restored = tool.restore_command(image, target, fmt)
        result = tool.run(cmd, f"restore {image.path.name} to {fmt}")
        if not restored.is_file():
            raise PhaseError(f"{tool.name} restore: {restored} was not written")
        if fmt == "raw":
            verified = files_equal(image.path, restored)
        else:
            verified = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt, str(image.path),
                                       str(restored)]).returncode == 0
        disk, apparent = disk_usage(restored)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    return PhaseResult(
        ok=verified,
        seconds=result.seconds,
        bytes=disk,
        apparent_bytes=apparent,
        peak_rss_bytes=result.peak_rss_bytes,
        verified=verified,
        error=None if verified else "restored image differs from base.img",
        report=tool.report(result.stdout),
    )


def list_phase(tool: Tool, cmd: Command) -> PhaseResult:
    result = tool.run(cmd, "list")
    return PhaseResult(ok=True, seconds=result.seconds, peak_rss_bytes=result.peak_rss_bytes)


def api_phase(tool: Raksha, phase: str, image: Input, cache: str) -> PhaseResult:
    """The driver times the backup itself (after opening the vault); its process is not what is timed.

    The incremental runs API_INCREMENTAL_TRIALS times, each in a process of its own from the vault as the
    full left it: the first ones on hard-link copies (removed afterwards), the last on the vault itself,
    whose growth is the phase's bytes. Seconds are the trials' median, peak memory their largest."""
    vault = tool.api_repo if phase == "incremental_api" else tool.root / "vault-api-full"
    trials = API_INCREMENTAL_TRIALS if phase == "incremental_api" else 1
    outs: list[dict[str, Any]] = []
    for trial in range(trials):
        last = trial == trials - 1
        copy = vault.with_name(f"{vault.name}.trial")
        if not last:
            shutil.rmtree(copy, ignore_errors=True)
            subprocess.run(["cp", "-al", str(vault), str(copy)], check=True)  # objects are immutable
            settle(cache)
        else:
            before_disk, before_apparent = disk_usage(vault)  # the last trial's growth is the phase's
        try:
            result = tool.run(tool.api_command(phase, image, cache, None if last else copy),
                              f"{phase} {image.path.name}")
        finally:
            if not last:
                shutil.rmtree(copy, ignore_errors=True)
        out = parse_json_output(result.stdout)
        if out is None or not isinstance(out.get("seconds"), int | float):
            raise PhaseError(f"raksha {phase}: no JSON from the engine driver: {result.stdout[-300:]}")
        outs.append({**out, "process_seconds": result.seconds})
    after_disk, after_apparent = disk_usage(vault)
    report = outs[-1].get("report") or {}
    seconds = [float(o["seconds"]) for o in outs]
    return PhaseResult(
        ok=True,
        seconds=statistics.median(seconds),
        bytes=after_disk - before_disk,
        apparent_bytes=after_apparent - before_apparent,
        peak_rss_bytes=max(int(o.get("peak_rss_bytes") or 0) for o in outs) or None,
        bytes_read=int(report["bytes_read"]) if isinstance(report.get("bytes_read"), int) else None,
        report={**report, "cpu_seconds": statistics.median(float(o.get("cpu_seconds") or 0) for o in outs),
                "process_seconds": outs[-1]["process_seconds"], "seconds_trials": seconds},
    )


def guarded(phase: Callable[[], PhaseResult]) -> PhaseResult:
    """Run a phase, turning any failure into a failed PhaseResult."""
    try:
        return phase()
    except Exception as exc:  # a failing tool must never stop the benchmark
        return PhaseResult(ok=False, error=f"{type(exc).__name__}: {exc}")


def wait_for_quiet_disk(max_wait: float = 60.0, quiet_mb_s: float = 5.0, window: float = 0.5) -> float:
    """Untimed, once after generating the images: sync, then wait until the block devices write less
    than ``quiet_mb_s`` for two windows running (the host may still be writing the guest's disk out
    after a sync returns). Returns the seconds waited; gives up after ``max_wait``."""
    disks = {d for d in os.listdir("/sys/block") if not d.startswith(("loop", "ram", "zram", "dm-"))}

    def written() -> int:
        with open("/proc/diskstats") as f:
            return sum(int(p[9]) * 512 for p in (line.split() for line in f) if len(p) > 9 and p[2] in disks)

    start = time.monotonic()
    os.sync()
    quiet, last = 0, written()
    while quiet < 2 and time.monotonic() - start < max_wait:
        time.sleep(window)
        now = written()
        quiet = quiet + 1 if (now - last) / window / MB < quiet_mb_s else 0
        last = now
    return time.monotonic() - start


def settle(cache: str) -> None:
    """Untimed, before every phase: no dirty-page backlog from earlier writes; in cold mode no cached data."""
    os.sync()
    if cache == "cold":
        DROP_CACHES.write_text("3\n")


def run_tool(tool: Tool, inputs: Inputs, cache: str = "warm") -> ToolResult:
    result = ToolResult(tool.name)
    result.error = tool.missing()
    if result.error is not None:
        return result
    try:
        result.version = tool.version()
        tool.init()
    except Exception as exc:
        result.error = f"setup failed: {type(exc).__name__}: {exc}"
        return result
    phases: dict[str, Callable[[], PhaseResult]] = {
        "full": lambda: backup_phase(tool, inputs.base),
        "incremental": lambda: backup_phase(tool, inputs.changed),
        "restore": lambda: restore_phase(tool, inputs.base),
        "clone": lambda: backup_phase(tool, inputs.clone),
    }
    for name, phase in phases.items():
        if name != "full" and not result.phase_ok("full"):
            result.phases[name] = PhaseResult(ok=False, error="skipped: the full backup failed")
            continue
        print(f"  {tool.name}: {name} ...", flush=True)
        settle(cache)
        result.phases[name] = guarded(phase)
        if result.phases[name].error:
            print(f"  {tool.name}: {name} FAILED: {result.phases[name].error}", flush=True)
        if name == "full" and isinstance(tool, Raksha) and result.phase_ok("full"):
            tool.snapshot_after_full()
    listing = tool.list_command()
    if listing is not None and result.phase_ok("full"):
        print(f"  {tool.name}: {LIST_PHASE} ...", flush=True)
        settle(cache)
        result.phases[LIST_PHASE] = guarded(lambda: list_phase(tool, listing))
    if isinstance(tool, Raksha) and result.phase_ok("full"):
        print(f"  {tool.name}: {QCOW2_PHASE} ...", flush=True)
        settle(cache)
        result.phases[QCOW2_PHASE] = guarded(lambda: restore_phase(tool, inputs.base, "qcow2"))
        for name, image in (("full_api", inputs.base), ("incremental_api", inputs.changed)):
            print(f"  {tool.name}: {name} (engine API, vault already open) ...", flush=True)
            settle(cache)
            result.phases[name] = guarded(lambda n=name, i=image: api_phase(tool, n, i, cache))
            if result.phases[name].error:
                print(f"  {tool.name}: {name} FAILED: {result.phases[name].error}", flush=True)
    return result


# ---------------------------------------------------------------- inputs


def prepare_workdir(workdir: Path) -> None:
    """Wipe and recreate ``workdir``; refuse to wipe a non-empty directory we did not create."""
    if workdir.exists():
        if any(workdir.iterdir()) and not (workdir / WORKDIR_MARKER).exists():
            raise SystemExit(f"refusing to wipe {workdir}: not empty and not a bench workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / WORKDIR_MARKER).touch()


def generate_inputs(workdir: Path, size: int, seed: int) -> Inputs:
    images = workdir / "images"
    images.mkdir()
    base, changed, clone = images / "base.img", images / "changed.img", images / "clone.img"
    start = time.perf_counter()
    imagegen.generate_image(base, size, seed)
    changed_extents = imagegen.make_changed_copy(base, changed, 0.01, seed)
    changed_json = imagegen.write_extents(changed, changed_extents)
    clone_extents = imagegen.make_clone(base, clone, 0.005, seed)
    imagegen.write_extents(clone, clone_extents)
    warm_page_cache([base, changed, clone])
    return Inputs(
        size=size,
        seed=seed,
        base=Input("base", base, "bench/run1/vm1/vda"),
        changed=Input("changed", changed, "bench/run2/vm1/vda", "bench/run1/vm1/vda", changed_json),
        clone=Input("clone", clone, "bench/run1/vm2/vda"),
        changed_extents=changed_extents,
        clone_extents=clone_extents,
        generate_seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------- ratios and targets


@dataclass
class Figure:
    """One derived number, optionally checked against a target."""

    key: str  # snake_case name in the JSON report
    name: str
    value: float | None
    unit: str = ""
    target: float | None = None
    op: str = ""  # ">=" or "<="
    note: str = ""
    worst_of_rounds: bool = False  # peak memory: the largest of any round, not the median
    rounds: list[float | None] = field(default_factory=list)  # every round's value, when there were several

    @property
    def status(self) -> str:
        if self.target is None:
            return ""
        if self.value is None:
            return "n/a"
        passed = self.value >= self.target if self.op == ">=" else self.value <= self.target
        return "PASS" if passed else "MISS"


FULL_TARGETS = {"restic": 4.0, "borg": 2.0}  # peer seconds / raksha seconds
RESTORE_TARGETS = {"restic": 2.0, "borg": 1.5}
INCREMENTAL_MAX_PCT = 5.0
CLONE_BYTES_PEER = "restic"  # raksha's clone bytes must not exceed this peer's
PEAK_RSS_MAX_MB = 150.0


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _less(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _percent(numerator: float | None, denominator: float | None) -> float | None:
    ratio = _ratio(numerator, denominator)
    return None if ratio is None else 100 * ratio


def _key(text: str) -> str:
    return text.replace("-", "_")


def _speed_figures(raksha: ToolResult, peers: list[ToolResult]) -> list[Figure]:
    figures = []
    for phase, label, targets in (
        ("full", "full throughput", FULL_TARGETS),
        ("restore", "restore speed", RESTORE_TARGETS),
    ):
        for peer in peers:
            figures.append(
                Figure(
                    key=f"{phase}_speedup_vs_{_key(peer.name)}",
                    name=f"{label} vs {peer.name}",
                    value=_ratio(peer.seconds(phase), raksha.seconds(phase)),
                    unit="x",
                    target=targets.get(peer.name),
                    op=">=",
                    note=f"{peer.name} seconds / raksha seconds",
                )
            )
    return figures


def _incremental_figures(raksha: ToolResult, peers: list[ToolResult], inputs: Inputs) -> list[Figure]:
    full = raksha.seconds("full")
    figures = [
        Figure(
            key="incremental_pct_of_full",
            name="raksha incremental time % of its full (CLI)",
            value=_percent(raksha.seconds("incremental"), full),
            unit="%",
            target=INCREMENTAL_MAX_PCT,
            op="<=",
            note="each a CLI command: process start + key derivation + backup + sync",
        ),
        Figure(
            key="incremental_api_pct_of_full_api",
            name="raksha incremental time % of its full (API)",
            value=_percent(raksha.seconds("incremental_api"), raksha.seconds("full_api")),
            unit="%",
            target=INCREMENTAL_MAX_PCT,
            op="<=",
            note="each through the engine API with the vault already open: backup + sync",
        ),
        Figure(
            key="incremental_api_pct_of_full",
            name="raksha API incremental % of CLI full",
            value=_percent(raksha.seconds("incremental_api"), full),
            unit="%",
            note="for comparison",
        ),
        Figure(
            key="incremental_less_list_pct_of_full_less_list",
            name="raksha CLI incr. % of full, less list",
            value=_percent(_less(raksha.seconds("incremental"), raksha.seconds(LIST_PHASE)),
                           _less(full, raksha.seconds(LIST_PHASE))),
            unit="%",
            note="for comparison: each CLI time less one command's fixed cost (the list phase)",
        ),
    ]
    for peer in peers:
        figures.append(
            Figure(
                key=f"{_key(peer.name)}_incremental_pct_of_raksha_full",
                name=f"{peer.name} incremental time % of raksha full",
                value=_percent(peer.seconds("incremental"), full),
                unit="%",
                note="for comparison",
            )
        )
    changed = inputs.changed_bytes
    allowance = 1.1 * changed + CHUNK_SIZE * len(inputs.changed_extents)
    phase = raksha.phases.get("incremental")
    bytes_read = phase.bytes_read if phase and phase.ok else None
    figures += [
        Figure(
            key="incremental_bytes_read_over_changed",
            name="raksha incremental bytes_read / changed",
            value=_ratio(bytes_read, changed),
            unit="x",
        ),
        Figure(
            key="incremental_bytes_read_mb",
            name="raksha incremental bytes_read",
            value=None if bytes_read is None else bytes_read / MB,
            unit="MB",
            target=allowance / MB,
            op="<=",
            note=f"1.1 x {changed / MB:.2f} MB changed + 1 MiB x {len(inputs.changed_extents)} extents",
        ),
    ]
    return figures


def _clone_figures(raksha: ToolResult, peers: list[ToolResult]) -> list[Figure]:
    mine = raksha.bytes("clone")
    return [
        Figure(
            key=f"clone_bytes_vs_{_key(peer.name)}",
            name=f"clone bytes raksha / {peer.name}",
            value=_ratio(mine, peer.bytes("clone")),
            unit="x",
            target=1.0 if peer.name == CLONE_BYTES_PEER else None,
            op="<=",
            note=f"raksha {_mb(mine)} MB vs {peer.name} {_mb(peer.bytes('clone'))} MB",
        )
        for peer in peers
    ]


def _peak_rss_mb(tool: ToolResult) -> float | None:
    rss = [p.peak_rss_bytes for p in tool.phases.values() if p.peak_rss_bytes]
    return max(rss) / MB if rss else None


def _rss_figures(raksha: ToolResult, peers: list[ToolResult]) -> list[Figure]:
    figures = [
        Figure(
            key="raksha_peak_rss_mb",
            name="raksha peak RSS (max over phases)",
            value=_peak_rss_mb(raksha),
            unit="MB",
            target=PEAK_RSS_MAX_MB,
            op="<=",
            worst_of_rounds=True,
        )
    ]
    for peer in peers:
        figures.append(
            Figure(
                key=f"{_key(peer.name)}_peak_rss_mb",
                name=f"{peer.name} peak RSS (max over phases)",
                value=_peak_rss_mb(peer),
                unit="MB",
                note="for comparison",
                worst_of_rounds=True,
            )
        )
    return figures


def _floor_figures(raksha: ToolResult, peers: list[ToolResult], floor: dict[str, float] | None) -> list[Figure]:
    """Each time against what the disk alone needs for the same I/O (bench/device_floor.py), and the
    speed ratios no software could beat on this disk: a peer's time over the floor plus Raksha's
    fixed cost per command (the list phase)."""
    if floor is None:
        return []
    fixed = raksha.seconds(LIST_PHASE) or 0.0
    figures = []
    for phase, key in (("full", "backup_seconds"), ("restore", "restore_seconds")):
        figures.append(Figure(
            key=f"raksha_{phase}_over_device_floor", name=f"raksha {phase} / device floor",
            value=_ratio(raksha.seconds(phase), floor[key]), unit="x",
            note=f"floor {floor[key]:.2f} s: the disk alone doing the same reads and writes"))
        for peer in peers:
            figures.append(Figure(
                key=f"{phase}_ceiling_vs_{_key(peer.name)}", name=f"{phase} ratio vs {peer.name} the disk allows",
                value=_ratio(peer.seconds(phase), floor[key] + fixed), unit="x",
                note=f"{peer.name} s / (floor + raksha's {fixed:.2f} s fixed cost): no tool's ratio can exceed it"))
    return figures


def compute_figures(results: dict[str, ToolResult], inputs: Inputs,
                    floor: dict[str, float] | None = None) -> list[Figure]:
    raksha = results.get("raksha") or ToolResult("raksha", error="not run")
    peers = [r for name, r in results.items() if name != "raksha"]
    return (
        _speed_figures(raksha, peers)
        + _floor_figures(raksha, peers, floor)
        + _incremental_figures(raksha, peers, inputs)
        + _clone_figures(raksha, peers)
        + _rss_figures(raksha, peers)
    )


# ---------------------------------------------------------------- rounds


def merge_results(rounds: list[dict[str, ToolResult]]) -> dict[str, ToolResult]:
    """Each tool's phases over the rounds: the round of the median time, with every round's time in
    ``seconds_rounds``; a phase that failed in any round is reported failed (with that round's error)."""
    merged: dict[str, ToolResult] = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds if name in r]
        out = ToolResult(name, version=runs[0].version, error=next((t.error for t in runs if t.error), None))
        for phase in dict.fromkeys(p for t in runs for p in t.phases):
            results = [t.phases.get(phase) for t in runs]
            good = [p for p in results if p is not None and p.ok and p.seconds is not None]
            if good:
                middle = statistics.median_high([p.seconds for p in good if p.seconds is not None])
                chosen = next(p for p in good if p.seconds == middle)
            else:
                chosen = next(p for p in results if p is not None)
            failed = [(k, p) for k, p in enumerate(results, 1) if p is None or not p.ok]
            if failed and good:
                k, bad = failed[0]
                chosen = replace(chosen, ok=False,
                                 error=f"round {k} of {len(runs)}: {bad.error if bad is not None else 'not run'}")
            out.phases[phase] = replace(
                chosen, seconds_rounds=[p.seconds if p is not None and p.ok else None for p in results])
        merged[name] = out
    return merged


def merge_figures(rounds: list[list[Figure]]) -> list[Figure]:
    """One figure per key over the rounds, each round's taken within that round (the tools on the same
    disk minutes apart): the median round's, for an even count the middle one worse for its target,
    and the largest for peak memory; every round's value in ``rounds``."""
    by_key: dict[str, list[Figure]] = {}
    for figures in rounds:
        for f in figures:
            by_key.setdefault(f.key, []).append(f)
    merged = []
    for same in by_key.values():
        valued = [f for f in same if f.value is not None]
        chosen = same[0]
        if valued and same[0].worst_of_rounds:
            chosen = max(valued, key=lambda f: f.value or 0.0)
        elif valued:
            values = [f.value for f in valued if f.value is not None]
            middle = statistics.median_high(values) if same[0].op == "<=" else statistics.median_low(values)
            chosen = next(f for f in valued if f.value == middle)
        merged.append(replace(chosen, rounds=[f.value for f in same]))
    return merged


def merge_floors(floors: list[dict[str, float] | None]) -> dict[str, Any] | None:
    """The device floor's median over the rounds, and every round's."""
    measured = [f for f in floors if f is not None]
    if not measured:
        return None
    out: dict[str, Any] = {key: statistics.median_high([f[key] for f in measured]) for key in measured[0]}
    out["rounds"] = measured
    return out


# ---------------------------------------------------------------- output


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / MB:.1f}"


def _summary(text: str, width: int = 110) -> str:
    """One line of an error: its first line and, for tracebacks, its last."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    summary = lines[0] if len(lines) == 1 else f"{lines[0][:50]} ... {lines[-1]}"
    return summary if len(summary) <= width else summary[: width - 3] + "..."


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


PHASE_TITLES = {
    "full_api": "full through the engine API (Raksha only; vault already open: no process start, no key "
    "derivation; time = backup call + sync)",
    "incremental_api": "incremental through the engine API (Raksha only; same vault state, extents and cache "
    f"as the CLI incremental; median of {API_INCREMENTAL_TRIALS} trials)",
    "full": "full: back up base.img into a fresh repository",
    "incremental": "incremental: back up changed.img (Raksha: --parent + --changed-extents)",
    "restore": "restore: restore the full backup of base.img and compare (time = tool command + sync)",
    QCOW2_PHASE: "restore to qcow2 (Raksha only): the full backup of base.img to a new qcow2 image, compared "
    "with qemu-img compare (time = command + sync)",
    "clone": "clone: back up clone.img into the same repository (bytes added)",
    LIST_PHASE: "list: list the repository's backups: about what every command pays before its work (process "
    "start, key derivation, reading the repository's index)",
}


def phase_table(phase: str, results: dict[str, ToolResult], size: int) -> Iterator[str]:
    yield f"== {PHASE_TITLES[phase]}"
    yield f"{'tool':<10} {'seconds':>9} {'MB/s':>8} {'MB disk':>9} {'MB appar.':>10} {'RSS MB':>7}  status"
    for name, tool in results.items():
        p = tool.phases.get(phase)
        if p is None:
            yield f"{name:<10} {'-':>9} {'-':>8} {'-':>9} {'-':>10} {'-':>7}  {_summary(tool.error or 'not run')}"
            continue
        speed = size / p.seconds / MB if p.seconds else None
        status = "ok" if p.ok else f"FAILED: {_summary(p.error or '')}"
        if phase in ("restore", QCOW2_PHASE) and p.verified is not None:
            status = "ok, identical" if p.verified else "FAILED: restored image differs"
        if p.bytes_read is not None:
            status += f" (bytes_read {_mb(p.bytes_read)} MB)"
        timed = [t for t in p.seconds_rounds if t is not None]
        if len(p.seconds_rounds) > 1 and timed:
            status += f"; rounds {min(timed):.2f}-{max(timed):.2f} s"
        yield (
            f"{name:<10} {_fmt(p.seconds, '9.2f')} {_fmt(speed, '8.1f')} {_mb(p.bytes):>9} "
            f"{_mb(p.apparent_bytes):>10} {_mb(p.peak_rss_bytes):>7}  {status}"
        )


def figures_table(figures: list[Figure]) -> Iterator[str]:
    several = any(len(f.rounds) > 1 for f in figures)
    yield "== Raksha vs peers" + (" (each figure within a round; the median round's, peak memory the largest)"
                                  if several else "")
    yield f"{'figure':<44} {'value':>10}  {'target':>10}  status  " + (f"{'rounds':<18} " if several else "") + "note"
    for f in figures:
        value = _fmt(f.value, ".2f") + f.unit if f.value is not None else "-"
        target = f"{f.op} {f.target:.4g}{f.unit}" if f.target is not None else ""
        spread = " / ".join(_fmt(v, ".3g") for v in f.rounds) if several else ""
        rounds = f"{spread:<18} " if several else ""
        yield f"{f.name:<44} {value:>10}  {target:>10}  {f.status:<6}  {rounds}{f.note}"


def print_report(results: dict[str, ToolResult], inputs: Inputs, figures: list[Figure], cache: str,
                 floor: dict[str, Any] | None = None) -> None:
    print()
    print(
        f"image: {inputs.size / MB:.0f} MB virtual ({inputs.size} bytes), seed {inputs.seed}; "
        f"changed {inputs.changed_bytes / MB:.2f} MB in {len(inputs.changed_extents)} extents; "
        f"clone changes {sum(n for _, n in inputs.clone_extents) / MB:.2f} MB"
    )
    for note in (CACHE_NOTES[cache], *NOTES):
        print(f"note: {note}")
    for phase in PHASES:
        print()
        print("\n".join(phase_table(phase, results, inputs.size)))
    listed = {name: r for name, r in results.items() if LIST_PHASE in r.phases}
    if listed:
        print()
        print("\n".join(phase_table(LIST_PHASE, listed, inputs.size)))
    raksha_only = {name: r for name, r in results.items() if any(p in r.phases for p in API_PHASES)}
    for phase in (QCOW2_PHASE, *API_PHASES) if raksha_only else ():
        print()
        print("\n".join(phase_table(phase, raksha_only, inputs.size)))
    if floor is not None:
        print()
        rounds = floor.get("rounds") or [floor]
        print("== device floor: the disk alone doing a full backup's and a restore's I/O (bench/device_floor.py: "
              "O_DIRECT, 2 readers + 2 writers at once, cold cache, no computing; "
              + (f"once a round, the median of {len(rounds)})" if len(rounds) > 1 else "fastest of 2)"))
        each = {key: " / ".join(f"{r[key]:.2f}" for r in rounds) for key in ("backup_seconds", "restore_seconds")}
        print(f"backup   read {floor['read_bytes'] / MB:.1f} MB of data chunks, "
              f"write {floor['stored_bytes'] / MB:.1f} MB: {floor['backup_seconds']:.2f} s"
              + (f" (rounds {each['backup_seconds']} s)" if len(rounds) > 1 else ""))
        print(f"restore  read {floor['stored_bytes'] / MB:.1f} MB, write {floor['data_bytes'] / MB:.1f} MB at the "
              f"image's offsets: {floor['restore_seconds']:.2f} s"
              + (f" (rounds {each['restore_seconds']} s)" if len(rounds) > 1 else ""))
    print()
    print("\n".join(figures_table(figures)))
    errors = {name: r.error for name, r in results.items() if r.error}
    for name, error in errors.items():
        print(f"error: {name}: {error}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at the end (1, 5, 15 min): {load} on {os.cpu_count()} cores")


def machine_info(results: dict[str, ToolResult]) -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0] if Path("/proc/meminfo").exists() else ""
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    return {
        # Other work on the machine shows here: timings under load are longer and noisier for every tool.
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory": meminfo.split(":", 1)[-1].strip(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tool_versions": {name: r.version for name, r in results.items()},
    }


def json_report(results: dict[str, ToolResult], inputs: Inputs, figures: list[Figure], cache: str,
                floor: dict[str, Any] | None = None, rounds: int = 1) -> dict[str, Any]:
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(results),
        "image": {
            "size": inputs.size,
            "seed": inputs.seed,
            "changed_bytes": inputs.changed_bytes,
            "extents": len(inputs.changed_extents),
            "clone_changed_bytes": sum(n for _, n in inputs.clone_extents),
            "clone_extents": len(inputs.clone_extents),
            "generate_seconds": round(inputs.generate_seconds, 3),
        },
        "cache": cache,
        "rounds": rounds,
        "device_floor": floor,
        "notes": [CACHE_NOTES[cache], *NOTES],
        "tools": {name: {p: asdict(r) for p, r in t.phases.items()} for name, t in results.items()},
        "errors": {name: t.error for name, t in results.items() if t.error},
        "ratios": {f.key: f.value for f in figures},
        "targets": {
            f.key: {
                "value": f.value,
                "unit": f.unit,
                "op": f.op,
                "target": f.target,
                "status": f.status,
                "note": f.note,
                "rounds": f.rounds,
            }
            for f in figures
            if f.target is not None
        },
    }


# ---------------------------------------------------------------- main


def parse_tools(text: str) -> list[str]:
    tools = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(tools) - set(ALL_TOOLS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown tools: {', '.join(unknown)} (known: {', '.join(ALL_TOOLS)})")
    return tools


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=imagegen.parse_size, default=imagegen.parse_size("2G"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=BENCH_DIR / "work", help="scratch, wiped and recreated")
    parser.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    parser.add_argument("--tools", type=parse_tools, default=list(ALL_TOOLS), help="comma-separated")
    parser.add_argument("--json-out", type=Path, default=BENCH_DIR / "results" / "latest.json")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per tool command")
    parser.add_argument("--raksha", type=Path, default=RAKSHA_BIN, help="the raksha executable to measure")
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat every tool's run this many times; ratios are the median round's (default 3)")
    parser.add_argument("--cache", choices=["cold", "warm"], default=None,
                        help="drop the page cache before every phase (cold; default where permitted) or not (warm)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cache is None:
        args.cache = "cold" if os.access(DROP_CACHES, os.W_OK) else "warm"
    workdir = args.workdir.resolve()
    prepare_workdir(workdir)
    print(f"generating {args.size} byte images (seed {args.seed}) in {workdir}/images ...", flush=True)
    inputs = generate_inputs(workdir, args.size, args.seed)
    print(f"  done in {inputs.generate_seconds:.1f}s", flush=True)
    waited = wait_for_quiet_disk()
    print(f"  disk quiet after {waited:.1f}s (untimed: the first tool's first phase would pay for the images' "
          "writeback)", flush=True)
    Raksha.executable = str(args.raksha)
    rounds: list[dict[str, ToolResult]] = []
    round_figures: list[list[Figure]] = []
    floors: list[dict[str, float] | None] = []
    for r in range(args.rounds):
        # Fresh repositories each round; the tools' order rotates so that none always runs first.
        order = args.tools[r % len(args.tools):] + args.tools[: r % len(args.tools)]
        where = workdir / f"round{r + 1}"
        if args.rounds > 1:
            print(f"round {r + 1} of {args.rounds}: {', '.join(order)}", flush=True)
        ran = {}
        for name in order:
            print(f"running {name} ...", flush=True)
            ran[name] = run_tool(TOOL_CLASSES[name](where, args.timeout), inputs, args.cache)
        results = {name: ran[name] for name in args.tools}
        floor = None
        stored = results["raksha"].bytes("full") if "raksha" in results else None
        if stored and args.cache == "cold":  # warm runs would time the page cache, not the disk
            print("measuring the device floor ...", flush=True)
            where.mkdir(parents=True, exist_ok=True)
            floor = device_floor.measure(inputs.base.path, stored, where, runs=1 if args.rounds > 1 else 2)
        rounds.append(results)
        floors.append(floor)
        round_figures.append(compute_figures(results, inputs, floor))
        if not (args.keep and r == args.rounds - 1):
            shutil.rmtree(where, ignore_errors=True)  # a round's repositories take a few GB
    results = merge_results(rounds)
    merged_floor = merge_floors(floors)
    figures = merge_figures(round_figures)
    print_report(results, inputs, figures, args.cache, merged_floor)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    report = json_report(results, inputs, figures, args.cache, merged_floor, args.rounds)
    args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json_out}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r.complete for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
