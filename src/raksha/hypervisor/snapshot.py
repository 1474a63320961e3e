"""The seed's libvirt driver: consistent external disk-only snapshots, for hosts without checkpoints.

A run freezes the guests, puts a new qcow2 overlay on every disk of every domain (one atomic
``snapshotCreateXML`` per domain) and thaws. The layers below each new overlay no longer change:
they are the point in time, read through qemu-nbd. Between runs exactly one Raksha overlay stays on
each disk (``base <- overlay_k``): the clusters it holds itself are exactly what the guest wrote since
run k, so run k+1 takes its changed extents from them, for raw disks and block devices too. Once the
run is in the vault, overlay_k is committed into the base (a non-active block commit), leaving
``base <- overlay_k+1``. Any failure before that pivots the new overlays back down and deletes them, so
the next run finds what the last good run left. See docs/design/snapshot-strategy.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import libvirt

from raksha.domain.errors import RakshaError, SourceError, VmGone
from raksha.hypervisor.disks import DiskInfo, backing_chain, domain_disks
from raksha.hypervisor.errors import translate
from raksha.hypervisor.strategy import (
    CRASH,
    FILESYSTEM,
    HookRun,
    Hooks,
    each,
    freeze_guests,
    post_thaw,
    pre_freeze,
    thaw_guests,
)
from raksha.vault.sources.base import Extent, merge_extents
from raksha.vault.sources.nbd import NbdSource, QemuNbdExport, end_stale_exports

log = logging.getLogger(__name__)

# <disk image>.raksha-<job>-<run>.qcow2: beside the disk, or in the overlay directory.
OVERLAY_MARK = re.compile(r"\.raksha-[A-Za-z0-9._-]+\.qcow2$")
DEFAULT_BLOCK_OVERLAY_DIR = "/var/lib/libvirt/images"  # block devices have no directory of their own
# The overlays are made before the freeze (qemu-img) and reused: half of libvirt's time inside the window.
SNAPSHOT_FLAGS = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                  | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT)


@dataclass(frozen=True)
class Layer:
    """One image of a disk's backing chain."""

    path: str
    format: str
    source_type: str  # file | block


def disk_chains(domain_xml: str) -> dict[str, list[Layer]]:
    """Each disk target's backing chain from the live domain XML, active layer first."""
    out: dict[str, list[Layer]] = {}
    for disk in ET.fromstring(domain_xml).findall("./devices/disk"):
        target = disk.find("target")
        if target is None:
            continue
        chain: list[Layer] = []
        node: ET.Element | None = disk
        top = True
        while node is not None:
            source = node.find("source")
            if source is None:
                break
            path = source.get("file") or source.get("dev")
            if not path:
                break
            fmt_el = node.find("driver") if top else node.find("format")
            chain.append(Layer(path, (fmt_el.get("type") if fmt_el is not None else None) or "raw",
                               node.get("type", "file")))
            node, top = node.find("backingStore"), False
        out[target.get("dev", "")] = chain
    return out


def is_overlay(path: str) -> bool:
    """Whether ``path`` is named like an overlay Raksha made."""
    return OVERLAY_MARK.search(os.path.basename(path)) is not None


def overlay_path(base: Layer, job: str, run: str, overlay_dir: str | None = None) -> str:
    directory = overlay_dir or (os.path.dirname(base.path) if base.source_type == "file"
                                else DEFAULT_BLOCK_OVERLAY_DIR)
    return os.path.join(directory, f"{os.path.basename(base.path)}.raksha-{job}-{run}.qcow2")


def overlay_extents(path: str, depth: int = 0) -> list[Extent]:
    """The clusters the overlay ``path`` and the ``depth`` layers below it hold themselves: data or zeros
    written since the lowest of them was put on top (``qemu-img map`` depth 0..depth)."""
    res = subprocess.run(["qemu-img", "map", "-U", "-f", "qcow2", "--output=json", path],
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise SourceError(f"{path}: qemu-img map failed: {res.stderr.strip()}")
    return list(merge_extents([(int(e["start"]), int(e["length"])) for e in json.loads(res.stdout)
                               if 0 <= int(e.get("depth", -1)) <= depth]))


SNAPSHOT_OVERLAY = "snapshot-overlay"  # tracking method: the parent run's overlay holds the changes
UNTRACKED = "none"  # pure mode: no overlay kept, every run reads in full


@dataclass
class DiskState:
    """One disk of one run: where its point in time is, what changed, and what becomes of its layers."""

    target: str
    below: Layer  # the active layer before the run: the point in time, read with its backing chain
    base: Layer  # the disk itself: the first layer of the chain that is not a Raksha overlay
    overlay: str  # the run's new overlay
    stale: list[str]  # Raksha overlays between the new overlay and the base, committed after the run
    method: str = SNAPSHOT_OVERLAY
    incremental: bool = False
    note: str = "full read"
    previous: str | None = None  # the parent run's overlay: its clusters, and those above it, are the changes
    depth: int = 0  # layers above it (0: it is the active layer, as the parent run left it)
    extents: list[Extent] | None = None
    taken: bool = False  # the new overlay is on the disk


@dataclass
class SnapshotDomainPoint:
    """One domain's share of a snapshot consistency group (strategy.DomainPoint)."""

    domain: libvirt.virDomain
    disks: list[DiskInfo]
    states: dict[str, DiskState]
    keep_overlay: bool = True
    excluded: list[DiskInfo] = field(default_factory=list)
    others: list[str] = field(default_factory=list)  # cdroms and other devices the snapshot leaves alone
    consistency: str = CRASH
    why: str = ""
    error: RakshaError | None = None  # set when this domain failed: its overlays are rolled back on exit
    sources: list[NbdSource] = field(default_factory=list)

    def plan(self, disk: DiskInfo) -> DiskState:
        return self.states[disk.target]

    def fail(self, error: RakshaError) -> None:
        """The caller could not back this domain up: roll its new overlays back on exit."""
        self.error = error

    def source(self, disk: DiskInfo) -> NbdSource:
        """The disk as it was at the snapshot: the layer below the new overlay, with its backing chain."""
        below = self.states[disk.target].below
        export = QemuNbdExport(below.path, below.format)
        src = NbdSource(export.socket, path=f"{self.domain.name()}:{disk.target}", fmt=disk.format, export=export)
        self.sources.append(src)
        return src

    def changed_extents(self, disk: DiskInfo, source: NbdSource) -> Sequence[Extent]:
        extents = self.states[disk.target].extents
        if extents is None:
            raise SourceError(f"{self.domain.name()}:{disk.target}: no changed extents (read it in full)")
        return extents

    def backing_chain(self, disk: DiskInfo) -> list[dict[str, str]]:
        return backing_chain(disk.path)

    def definition(self) -> str:
        return str(self.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE))

    def reads_done(self) -> None:
        """Nothing to end early: the overlays are committed back when the group closes."""

    def close_sources(self) -> None:
        for src in self.sources:
            src.close()
        self.sources.clear()


@dataclass
class SnapshotGroupPoint:
    domains: list[SnapshotDomainPoint]
    freeze_ms: float = 0.0
    hooks: HookRun = field(default_factory=HookRun)  # the pre-freeze/post-thaw hooks, and their time
    started_at: float = field(default_factory=time.time)
    cleanup_errors: list[str] = field(default_factory=list)  # layers left for the next run to collapse


def _plan_disk(disk: DiskInfo, chain: list[Layer], job: str, run: str, parent_run: str | None,
               overlay_dir: str | None, keep_overlay: bool) -> DiskState:
    if not chain:
        raise SourceError(f"disk {disk.target}: no source in the domain XML")
    # Every layer named like an overlay (a restore in place wrote an image over one): the bottom is the disk.
    base_at = next((i for i, layer in enumerate(chain) if not is_overlay(layer.path)), len(chain) - 1)
    base = chain[base_at]
    new = overlay_path(base, job, run, overlay_dir)
    state = DiskState(disk.target, below=chain[0], base=base, overlay=new,
                      stale=[layer.path for layer in chain[:base_at]])
    if not keep_overlay:
        state.method = UNTRACKED
    if parent_run is None:
        state.note = (f"full read; overlay {os.path.basename(new)} starts tracking" if keep_overlay
                      else "full read (external snapshot, pure mode: no overlay is kept)")
        return state
    expected = overlay_path(base, job, parent_run, overlay_dir)
    above = [layer.path for layer in chain[:base_at]]
    if expected in above and os.path.exists(expected):
        # Normally the active layer; below newer Raksha overlays when a run died before committing them
        # (their clusters are changes since the parent run too).
        state.previous, state.incremental, state.depth = expected, True, above.index(expected)
        state.note = f"clusters written to overlay {os.path.basename(expected)} since run {parent_run}"
        if state.depth:
            state.note += f" and to {state.depth} overlay(s) an interrupted run left above it"
        if not keep_overlay:
            state.note += " (pure mode: no overlay is kept after this run)"
        return state
    if not keep_overlay and base_at == 0:
        state.note = "full read (external snapshot, pure mode: no overlay is kept)"
        return state
    found = " <- ".join(os.path.basename(layer.path) for layer in reversed(chain))
    state.note = (f"full read: overlay {os.path.basename(expected)} of run {parent_run} is not in the disk's "
                  f"chain {found} (committed or removed outside Raksha, or the domain restarted from another "
                  "definition)")
    if os.path.exists(expected) and expected not in (layer.path for layer in chain):
        state.note += f"; {expected} is left on disk, unused"
    return state


def end_stale_commits(dom: libvirt.virDomain, timeout: float) -> list[str]:
    """Finish block commits a dead Raksha run left on disks whose active layer is a Raksha overlay: an
    active commit (a rollback or pure mode cut short before its pivot) is pivoted, a plain one waited for.
    A block job left on the disk would make the next snapshot fail. Returns the disk targets."""
    done = []
    for target, chain in disk_chains(dom.XMLDesc(0)).items():
        if not chain or not is_overlay(chain[0].path):
            continue
        try:
            info = dom.blockJobInfo(target, 0)
        except libvirt.libvirtError:
            continue
        kind = info.get("type") if info else None
        if kind not in (libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT, libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT):
            continue
        _wait_job(dom, target, pivot=kind == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT, timeout=timeout)
        done.append(target)
    return done


def _prepare(dom: libvirt.virDomain, job: str, run: str, parent_run: str | None, skip: set[str],
             overlay_dir: str | None, keep_overlay: bool, timeout: float) -> SnapshotDomainPoint:
    finished = end_stale_commits(dom, timeout) if dom.isActive() else []
    if finished:
        log.warning("%s: finished block commits an interrupted run left on %s", dom.name(), finished)
    xml = dom.XMLDesc(0)
    chains = disk_chains(xml)
    stopped = end_stale_exports({layer.path for chain in chains.values() for layer in chain})
    if stopped:
        log.warning("%s: stopped qemu-nbd exports %s left by a dead Raksha process", dom.name(), stopped)
    disks = domain_disks(xml)
    point = SnapshotDomainPoint(dom, [], {}, keep_overlay, excluded=[d for d in disks if d.target in skip],
                                others=[t for t in chains if t not in {d.target for d in disks}])
    if not dom.isActive():
        point.error = VmGone(f"{dom.name()}: not running (external snapshots need a running domain)")
        return point
    for d in disks:
        if d.target in skip:
            continue
        state = _plan_disk(d, chains.get(d.target, []), job, run, parent_run, overlay_dir, keep_overlay)
        if os.path.exists(state.overlay) and state.overlay not in (layer.path for layer in chains[d.target]):
            os.unlink(state.overlay)  # left by a run of the same name that died before cleaning up
        point.states[d.target] = state
        # The disk as its owner knows it (its base image), whatever overlay is on top just now.
        point.disks.append(DiskInfo(d.target, state.base.path, state.base.source_type, state.base.format, d.bus,
                                    d.device))
    return point


def _map_changes(p: SnapshotDomainPoint) -> None:
    """After the snapshot the parent run's overlay is read-only: its own clusters are the changed extents."""
    for s in p.states.values():
        if s.previous is None:
            continue
        try:
            s.extents = overlay_extents(s.below.path, s.depth)
        except (SourceError, subprocess.TimeoutExpired) as exc:
            s.incremental, s.note = False, f"full read: cannot map overlay {os.path.basename(s.previous)}: {exc}"


def _snapshot_xml(name: str, p: SnapshotDomainPoint) -> str:
    parts = [f"<disk name='{s.target}' snapshot='external' type='file'><driver type='qcow2'/>"
             f"<source file='{s.overlay}'/></disk>" for s in p.states.values()]
    parts += [f"<disk name='{t}' snapshot='no'/>" for t in [d.target for d in p.excluded] + p.others]
    return (f"<domainsnapshot><name>{name}</name><description>Raksha point in time; the overlays are "
            f"committed by its next run</description><disks>{''.join(parts)}</disks></domainsnapshot>")


def _create_overlays(p: SnapshotDomainPoint) -> None:
    """Each disk's new overlay, backed by its active layer, made before the freeze (libvirt reuses it)."""
    if p.error is not None:
        return
    for s in p.states.values():
        if os.path.exists(s.overlay):  # in the chain: this run's name was used before (never overwrite it)
            raise SourceError(f"{s.overlay} already exists and is in use: run names must be new")
        size = p.domain.blockInfo(s.target, 0)[0]
        res = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", s.below.format,
                              "-b", s.below.path, s.overlay, str(size)], capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise SourceError(f"{s.overlay}: qemu-img create failed: {res.stderr.strip()}")


def _snapshot(name: str) -> Callable[[SnapshotDomainPoint], None]:
    def take(p: SnapshotDomainPoint) -> None:
        p.domain.snapshotCreateXML(_snapshot_xml(name, p), SNAPSHOT_FLAGS)
        for s in p.states.values():
            s.taken = True

    return take


def _chain(dom: libvirt.virDomain, target: str) -> list[str]:
    return [layer.path for layer in disk_chains(dom.XMLDesc(0)).get(target, [])]


def _mirror_ready(domain_xml: str, target: str) -> bool:
    """Whether the disk's active block commit has caught up (``<mirror ready='yes'>``) and can pivot."""
    for disk in ET.fromstring(domain_xml).findall("./devices/disk"):
        t, mirror = disk.find("target"), disk.find("mirror")
        if t is not None and t.get("dev") == target and mirror is not None:
            return mirror.get("ready") == "yes"
    return False


def _wait_job(dom: libvirt.virDomain, target: str, *, pivot: bool, timeout: float) -> None:
    """Wait for the disk's block job to end; an active commit is pivoted once it is ready."""
    deadline = time.monotonic() + timeout
    while True:
        info = dom.blockJobInfo(target, 0)
        if not info:
            return
        if pivot and _mirror_ready(dom.XMLDesc(0), target):
            dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            continue
        if time.monotonic() > deadline:
            try:
                dom.blockJobAbort(target, 0)
            except libvirt.libvirtError:
                pass
            raise SourceError(f"{dom.name()}:{target}: block commit did not end within {timeout:.0f} s")
        time.sleep(0.02)


def _commit(dom: libvirt.virDomain, target: str, base: str | None, top: str | None, flags: int,
            timeout: float) -> None:
    """A block commit of ``top`` into ``base`` (active when ``top`` is None), deleting the committed files."""
    try:
        dom.blockCommit(target, base, top, 0, flags | libvirt.VIR_DOMAIN_BLOCK_COMMIT_DELETE)
    except libvirt.libvirtError:
        dom.blockCommit(target, base, top, 0, flags)  # no DELETE here: the caller removes the files
    _wait_job(dom, target, pivot=bool(flags & libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE), timeout=timeout)


def _remove(paths: list[str]) -> None:
    for path in paths:
        if is_overlay(path) and os.path.exists(path):
            os.unlink(path)


def _finish_disk(p: SnapshotDomainPoint, s: DiskState, timeout: float) -> None:
    """After a good run: commit what lies between the new overlay and the base; the chain is base <- overlay."""
    dom = p.domain
    if not p.keep_overlay:  # the seed's pure mode: everything back into the base, nothing kept
        _commit(dom, s.target, s.base.path, None, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE, timeout)
        if _chain(dom, s.target)[0] != s.base.path:
            raise SourceError(f"the active commit into {s.base.path} did not pivot")
        _remove([s.overlay, *s.stale])
        return
    if s.stale:
        _commit(dom, s.target, s.base.path, s.below.path, 0, timeout)
        chain = _chain(dom, s.target)
        if chain[:2] != [s.overlay, s.base.path]:
            raise SourceError(f"the commit into {s.base.path} left the chain {' <- '.join(reversed(chain))}")
        _remove(s.stale)


def _roll_back_disk(p: SnapshotDomainPoint, s: DiskState, timeout: float) -> None:
    """Undo a run's snapshot: the new overlay is committed into the layer below (the guest's writes since
    the snapshot are kept) and deleted, so the disk is as the last good run left it."""
    dom = p.domain
    if s.taken and _chain(dom, s.target)[0] == s.overlay:
        shallow = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
        _commit(dom, s.target, None, None, shallow, timeout)
        if _chain(dom, s.target)[0] != s.below.path:
            raise SourceError(f"the active commit into {s.below.path} did not pivot")
    if s.overlay not in _chain(dom, s.target):
        _remove([s.overlay])


@contextmanager
def snapshot_group(domains: list[libvirt.virDomain], job: str, run: str, parent_run: str | None = None, *,
                   freeze: bool = True, exclude: dict[str, set[str]] | None = None,
                   overlay_dir: str | None = None, keep_overlay: bool = True,
                   job_timeout: float = 3600.0, hooks: Hooks | None = None) -> Iterator[SnapshotGroupPoint]:
    """Take one point in time over ``domains`` with external snapshots, as run ``run`` of ``job``.

    ``parent_run`` is the run whose overlay should be the active layer of every disk (its clusters are
    the changes); a disk where it is not is read in full and says why. ``exclude`` maps a domain name
    to disk targets left out. ``keep_overlay=False`` is the seed's pure mode: no overlay stays after
    the run, so the next run reads in full. A domain whose snapshot fails, or that the caller marks
    with ``fail()``, has its new overlays pivoted back and deleted on exit; the others have their old
    layers committed (a failure there is logged and left for the next run, which collapses it). An
    exception out of the ``with`` body rolls every domain back. ``hooks``: the guest scripts run before the
    freeze and after the thaw (strategy.Hooks); a frozen guest whose pre-freeze hook exited 0 reaches
    ``application``.
    """
    points = []
    for dom in domains:
        try:
            points.append(_prepare(dom, job, run, parent_run, (exclude or {}).get(dom.name(), set()),
                                   overlay_dir, keep_overlay, job_timeout))
        except (libvirt.libvirtError, RakshaError, OSError) as exc:  # this domain fails; the others go on
            error = (translate(exc, f"{dom.name()}: preparing the snapshot") if isinstance(exc, libvirt.libvirtError)
                     else exc if isinstance(exc, RakshaError) else SourceError(f"{dom.name()}: {exc}"))
            points.append(SnapshotDomainPoint(dom, [], {}, keep_overlay, error=error))
    group = SnapshotGroupPoint(points)
    name = f"raksha-{job}-{run}"
    ok = False
    try:
        for p, err in zip(points, each(_create_overlays, points), strict=True):
            if err is not None and p.error is None:
                p.error = (translate(err, f"{p.domain.name()}: creating the overlays") if isinstance(
                    err, libvirt.libvirtError) else SourceError(f"{p.domain.name()}: creating the overlays: {err}"))
        live = [p for p in points if p.error is None]
        if freeze:
            group.hooks = pre_freeze(live, hooks)  # before the window: their time is not the guests' freeze
        t0 = time.monotonic()
        try:
            frozen = freeze_guests(group.hooks.to_freeze(live)) if freeze else []
            try:
                for p, err in zip(live, each(_snapshot(name), live), strict=True):
                    if isinstance(err, libvirt.libvirtError):  # atomic: none of its disks has the new overlay
                        p.error = translate(err, f"{p.domain.name()}: the external snapshot failed")
                    elif err is not None:
                        raise err
            finally:
                thawed = thaw_guests(frozen)
                for p in points:
                    p.consistency = group.hooks.reached(
                        p, FILESYSTEM if p in thawed and p.error is None else CRASH)
                # The window is the time a guest was frozen: none frozen (crash wanted, no agent), no window.
                group.freeze_ms = (time.monotonic() - t0) * 1000 if frozen else 0.0
        finally:
            post_thaw(group.hooks, hooks)  # after the thaw, whatever happened: what the pre-freeze hook did is undone
        for p in points:
            if p.error is None:
                _map_changes(p)
        yield group
        ok = True
    except libvirt.libvirtError as exc:
        raise translate(exc, "snapshot backup failed") from exc
    finally:
        for p in points:
            p.close_sources()  # qemu-nbd's locks would keep a commit from writing into the layers it reads
            for s in p.states.values():
                try:
                    if ok and p.error is None:
                        _finish_disk(p, s, job_timeout)
                    else:
                        _roll_back_disk(p, s, job_timeout)
                except (libvirt.libvirtError, SourceError, OSError) as err:
                    what = "committing the old layers" if ok and p.error is None else "rolling back"
                    msg = f"{p.domain.name()}:{s.target}: {what} failed, left for the next run: {err}"
                    log.warning("%s", msg)
                    group.cleanup_errors.append(msg)
