"""The snapshot strategy's decisions, from the live domain XML alone: which layer is the base, which
overlay holds the changes, and why a disk is read in full. Overlay extents come from real qemu-img."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from raksha.hypervisor.disks import DiskInfo
from raksha.hypervisor.snapshot import (
    DiskState,
    Layer,
    _plan_disk,
    disk_chains,
    is_overlay,
    overlay_extents,
    overlay_path,
)

DISK = DiskInfo("vdb", "/img/data.raw", "file", "raw", "virtio", "disk")


def domain_xml(*layers: tuple[str, str]) -> str:
    """A live domain XML with one disk vdb whose chain is ``layers`` (path, format), active first."""
    (top, top_fmt), rest = layers[0], layers[1:]
    backing = "<backingStore/>"
    for path, fmt in reversed(rest):
        kind, attr = ("block", "dev") if path.startswith("/dev/") else ("file", "file")
        backing = (f"<backingStore type='{kind}' index='1'><format type='{fmt}'/><source {attr}='{path}'/>"
                   f"{backing}</backingStore>")
    return (f"<domain><devices><disk type='file' device='disk'><driver name='qemu' type='{top_fmt}'/>"
            f"<source file='{top}'/>{backing}<target dev='vdb' bus='virtio'/></disk>"
            "<disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk></devices></domain>")


def plan(layers: list[tuple[str, str]], parent: str | None, *, keep: bool = True) -> DiskState:
    chain = disk_chains(domain_xml(*layers))["vdb"]
    for layer in chain:  # the layers exist (the strategy checks the parent's overlay file)
        Path(layer.path).touch()
    return _plan_disk(DISK, chain, "job", "r3", parent, None, keep)


def test_chains_and_names(tmp_path: Path) -> None:
    chains = disk_chains(domain_xml((f"{tmp_path}/data.raw.raksha-job-r2.qcow2", "qcow2"),
                                    (f"{tmp_path}/data.raw", "raw")))
    assert chains["vdb"] == [Layer(f"{tmp_path}/data.raw.raksha-job-r2.qcow2", "qcow2", "file"),
                             Layer(f"{tmp_path}/data.raw", "raw", "file")]
    assert chains["sda"] == []  # an empty cdrom: left out of the snapshot
    assert is_overlay("/x/data.raw.raksha-job-r2.qcow2") and not is_overlay("/x/data.qcow2")
    assert overlay_path(Layer("/dev/vg/vol", "raw", "block"), "j", "r", None) == \
        "/var/lib/libvirt/images/vol.raksha-j-r.qcow2"
    assert overlay_path(Layer("/dev/vg/vol", "raw", "block"), "j", "r", "/srv/ov") == "/srv/ov/vol.raksha-j-r.qcow2"


def test_first_run_is_full_and_starts_tracking(tmp_path: Path) -> None:
    s = plan([(f"{tmp_path}/data.raw", "raw")], None)
    assert not s.incremental and "starts tracking" in s.note
    assert s.base.path == s.below.path == f"{tmp_path}/data.raw" and s.stale == []
    assert s.overlay == f"{tmp_path}/data.raw.raksha-job-r3.qcow2"


def test_the_parents_overlay_on_top_makes_an_incremental(tmp_path: Path) -> None:
    s = plan([(f"{tmp_path}/data.raw.raksha-job-r2.qcow2", "qcow2"), (f"{tmp_path}/data.raw", "raw")], "r2")
    assert s.incremental and s.depth == 0 and s.previous == f"{tmp_path}/data.raw.raksha-job-r2.qcow2"
    assert s.stale == [s.previous]  # committed into the base after the run
    assert s.overlay == f"{tmp_path}/data.raw.raksha-job-r3.qcow2"  # named after the base, not the overlay


def test_overlays_a_dead_run_left_above_the_parents_count_as_changes(tmp_path: Path) -> None:
    s = plan([(f"{tmp_path}/data.raw.raksha-job-dead.qcow2", "qcow2"),
              (f"{tmp_path}/data.raw.raksha-job-r2.qcow2", "qcow2"), (f"{tmp_path}/data.raw", "raw")], "r2")
    assert s.incremental and s.depth == 1 and "1 overlay(s) an interrupted run left" in s.note
    assert len(s.stale) == 2


def test_an_overlay_gone_from_the_chain_means_a_full_read_and_why(tmp_path: Path) -> None:
    s = plan([(f"{tmp_path}/data.raw", "raw")], "r2")
    assert not s.incremental
    assert "overlay data.raw.raksha-job-r2.qcow2 of run r2 is not in the disk's chain data.raw" in s.note
    (tmp_path / "data.raw.raksha-job-r2.qcow2").touch()  # still on disk, not in use: reported, kept
    s = plan([(f"{tmp_path}/data.raw", "raw")], "r2")
    assert "is left on disk, unused" in s.note and (tmp_path / "data.raw.raksha-job-r2.qcow2").exists()
    # Another job's overlay on top: the base is still the disk, that overlay is collapsed after the run.
    s = plan([(f"{tmp_path}/data.raw.raksha-other-r9.qcow2", "qcow2"), (f"{tmp_path}/data.raw", "raw")], "r2")
    assert not s.incremental and s.base.path == f"{tmp_path}/data.raw" and len(s.stale) == 1


def test_pure_mode_tracks_nothing(tmp_path: Path) -> None:
    s = plan([(f"{tmp_path}/data.raw", "raw")], "r2", keep=False)
    assert not s.incremental and s.method == "none" and "pure mode" in s.note


def test_overlay_extents_are_the_clusters_written_in_the_top_layers(tmp_path: Path) -> None:
    base, mid, top = tmp_path / "base.raw", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", str(base)], check=True, capture_output=True)
    for image, below, fmt, write in ((mid, base, "raw", "write -P 2 1M 64k"), (top, mid, "qcow2", "write -z 2M 64k")):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(below), str(image)], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", write, str(image)], check=True, capture_output=True)
    assert overlay_extents(str(mid)) == [(1 << 20, 64 << 10)]
    assert overlay_extents(str(top)) == [(2 << 20, 64 << 10)]  # zeros written are a change too
    assert overlay_extents(str(top), depth=1) == [(1 << 20, 64 << 10), (2 << 20, 64 << 10)]


def test_a_chain_of_overlays_alone_has_its_bottom_as_the_base(tmp_path: Path) -> None:
    # A restore in place wrote a standalone image over the overlay the domain pointed at.
    s = plan([(f"{tmp_path}/data.raw.raksha-job-r2.qcow2", "qcow2")], "r2")
    assert s.base.path == f"{tmp_path}/data.raw.raksha-job-r2.qcow2" and s.stale == [] and not s.incremental
    assert s.overlay == f"{tmp_path}/data.raw.raksha-job-r2.qcow2.raksha-job-r3.qcow2"
