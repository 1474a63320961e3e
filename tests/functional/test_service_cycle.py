"""The whole cycle through the service's API over HTTP, on real guests and a real libvirtd:
a job over two running VMs (a qcow2 and a raw data disk), a full run, data written in the guests,
an incremental run, and a restore of the incremental to new VMs that boot and hold that data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, make_data_disk  # noqa: E402
from raksha_server import Server  # noqa: E402


def test_job_full_incremental_and_restore_to_new_vms_through_the_api(conn: libvirt.virConnect,
                                                                    tmp_path: Path) -> None:
    guest = build_guest()
    monday, tuesday = os.urandom(32 << 10), os.urandom(48 << 10)  # guest-exec input stays small
    with GuestDomain(conn, guest, [(make_data_disk(tmp_path / "a.qcow2", "64M"), "qcow2")], tmp_path,
                     name="raksha-svc-a") as a, \
            GuestDomain(conn, guest, [(make_data_disk(tmp_path / "b.raw", "64M", fmt="raw"), "raw")], tmp_path,
                        name="raksha-svc-b") as b, \
            Server(tmp_path / "srv", libvirt_uri=conn.getURI()) as srv:
        a.wait_for_agent(timeout=240)
        b.wait_for_agent(timeout=240)
        # a has an application hook (installed into its running root), b none: a reaches application.
        assert a.exec("mkdir -p /etc/raksha/hooks && printf '#!/bin/sh\\nsync\\n' > /etc/raksha/hooks/pre-freeze"
                      " && chmod 755 /etc/raksha/hooks/pre-freeze")[0] == 0
        api = srv.client("demo")
        job = api.post("/backupjobs", {"backupjob": {
            "name": "app", "vms": [{"id": "raksha-svc-a"}, {"id": b.dom.UUIDString()}]}}).body["backupjob"]
        runs = {}
        for step, data, kind in (("monday", monday, "full"), ("tuesday", tuesday, "incremental")):
            for vm in (a, b):
                assert vm.exec(f"cat > /mnt/vda/{step}.bin && sync", stdin=data)[0] == 0
            started = api.post(f"/backupjobs/{job['id']}/{kind}")
            assert started.status == 202, started
            runs[step] = api.wait(f"/backupjobs/{job['id']}/backupjobsruns/{started.body['backupjobrun']['id']}",
                                  "backupjobrun", until=("available", "partial", "error"), timeout=600)
            run = runs[step]
            assert run["status"] == "available", run
            assert run["type"] == kind and run["progress_percent"] == 100
            assert run["consistency"] == "filesystem"  # the weakest: both guests froze, only a had a hook
            levels = {vm["name"]: (vm["consistency"], vm["consistency_note"]) for vm in run["vms"]}
            assert levels["raksha-svc-a"][0] == "application", levels
            assert levels["raksha-svc-b"][0] == "filesystem" and "no pre-freeze hook" in levels["raksha-svc-b"][1]
            assert {vm["name"] for vm in run["vms"]} == {"raksha-svc-a", "raksha-svc-b"}
            for vm in run["vms"]:
                (disk,) = vm["disks"]
                assert disk["status"] == "available" and disk["vault_url"].endswith(f"/{vm['uuid']}/vda")
                assert disk["type"] == kind
                if kind == "incremental":
                    # Changed-block tracking on both formats: about what was written, not the 64 MiB disk.
                    assert disk["bytes_read"] < 8 << 20, disk
                    assert disk["backing_backup_id"] is not None

        listed = api.get(f"/backupjobs/{job['id']}/backupjobsruns").body["backupjobruns"]
        assert [r["id"] for r in listed] == [runs["tuesday"]["id"], runs["monday"]["id"]]
        started = api.post(f"/backupjobs/{job['id']}/backupjobsruns/{runs['tuesday']['id']}",
                           {"restore": {"type": "new_vm", "target": {"name_prefix": "svc", "format": "qcow2"}}})
        assert started.status == 202, started
        restore = api.wait(f"/restores/{started.body['restore']['id']}", "restore",
                           until=("available", "error"), timeout=600)
        assert restore["status"] == "available", restore
        assert restore["progress_percent"] == 100
        produced = restore["results"]
        assert sorted(vm["domain"] for vm in produced) == ["svc-raksha-svc-a", "svc-raksha-svc-b"]
        copies = [GuestDomain.attached(conn, conn.lookupByName(vm["domain"]), tmp_path) for vm in produced]
        try:
            for vm, copy in zip(produced, copies, strict=True):
                (disk,) = vm["disks"]
                assert disk["verified"] and disk["chunks_verified"] == disk["chunks"]
                with copy:
                    copy.wait_for_agent(timeout=240)  # the restored VM boots and its agent answers
                    for name, data in (("monday", monday), ("tuesday", tuesday)):
                        code, out = copy.exec(f"cat /mnt/vda/{name}.bin")
                        assert code == 0 and out == data
        finally:
            for copy in copies:
                copy.__exit__(None, None, None)


def test_a_vm_gone_before_the_run_makes_it_partial_and_the_rest_restorable(conn: libvirt.virConnect,
                                                                          tmp_path: Path) -> None:
    """Also: a job that wants crash consistency gets it (no freeze, a note saying it was wanted)."""
    guest = build_guest()
    with GuestDomain(conn, guest, [(make_data_disk(tmp_path / "a.qcow2", "32M"), "qcow2")], tmp_path,
                     name="raksha-part-a") as a, \
            Server(tmp_path / "srv", libvirt_uri=conn.getURI()) as srv:
        gone = GuestDomain(conn, guest, [(make_data_disk(tmp_path / "b.qcow2", "32M"), "qcow2")], tmp_path,
                           name="raksha-part-b")
        with gone:
            api = srv.client("demo")
            # The job wants crash consistency: a, whose agent answers, is not frozen and says why.
            job = api.post("/backupjobs", {"backupjob": {
                "name": "two", "vms": [{"id": "raksha-part-a"}, {"id": "raksha-part-b"}],
                "consistency": "crash"}}).body["backupjob"]
            assert job["consistency"] == "crash"
        # raksha-part-b no longer exists when the run starts.
        a.wait_for_agent(timeout=240)
        started = api.post(f"/backupjobs/{job['id']}/full").body["backupjobrun"]
        run = api.wait(f"/backupjobruns/{started['id']}", "backupjobrun",
                       until=("available", "partial", "error"), timeout=600)
        assert run["status"] == "partial", run
        by_ref = {vm["name"] or vm["vm_id"]: vm for vm in run["vms"]}
        assert by_ref["raksha-part-a"]["status"] == "available"
        assert by_ref["raksha-part-b"]["status"] == "error"
        assert by_ref["raksha-part-b"]["error"]["code"] == "VM_NOT_FOUND"
        wanted_crash = by_ref["raksha-part-a"]
        assert wanted_crash["consistency"] == "crash", wanted_crash
        assert "crash consistency wanted" in (wanted_crash["consistency_note"] or ""), wanted_crash
        assert wanted_crash["freeze_ms"] in (0, None) and run["freeze_ms"] in (0, None), run
        assert run["consistency"] == "crash"
        # A partial run restores the VMs that made it.
        out = tmp_path / "files"
        out.mkdir()
        r = api.post(f"/backupjobruns/{run['id']}", {"restore": {"type": "files",
                                                                 "target": {"directory": str(out)}}})
        assert r.status == 202, r
        done = api.wait(f"/restores/{r.body['restore']['id']}", "restore", until=("available", "error"))
        assert done["status"] == "available", done
        assert [vm["source_name"] for vm in done["results"]] == ["raksha-part-a"]
        assert all(d["verified"] for vm in done["results"] for d in vm["disks"])


def test_restore_in_place_through_the_api_writes_what_differs_unless_asked_to_rewrite_whole(
        conn: libvirt.virConnect, tmp_path: Path) -> None:
    good, bad = os.urandom(48 << 10), os.urandom(48 << 10)
    template = GuestDomain(conn, build_guest(), [(make_data_disk(tmp_path / "a.qcow2", "64M"), "qcow2")], tmp_path,
                           name="raksha-svc-ip")
    dom = conn.defineXML(template.xml)  # in place: the same, persistent domain
    dom.create()
    with GuestDomain.attached(conn, dom, tmp_path) as vm, \
            Server(tmp_path / "srv", libvirt_uri=conn.getURI()) as srv:
        vm.wait_for_agent(timeout=240)
        api = srv.client("demo")
        job = api.post("/backupjobs", {"backupjob": {"name": "ip", "vms": [{"id": vm.name}]}}).body["backupjob"]
        assert vm.exec("cat > /mnt/vda/data.bin && sync", stdin=good)[0] == 0
        started = api.post(f"/backupjobs/{job['id']}/full").body["backupjobrun"]
        run = api.wait(f"/backupjobruns/{started['id']}", "backupjobrun", until=("available", "partial", "error"),
                       timeout=600)
        assert run["status"] == "available", run

        for target, method in (({}, "changed"), ({"rewrite_whole": True}, "whole")):
            assert vm.exec("cat > /mnt/vda/data.bin && sync", stdin=bad)[0] == 0
            body = {"restore": {"type": "in_place", **({"target": target} if target else {})}}
            r = api.post(f"/backupjobruns/{run['id']}", body)
            assert r.status == 202, r
            done = api.wait(f"/restores/{r.body['restore']['id']}", "restore", until=("available", "error"),
                            timeout=600)
            assert done["status"] == "available", done
            (disk,) = done["results"][0]["disks"]
            assert disk["method"] == method and disk["verified"], disk
            vm.wait_for_agent(timeout=240)
            code, out = vm.exec("cat /mnt/vda/data.bin")
            assert code == 0 and out == good, method
