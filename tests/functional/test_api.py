"""The REST API over HTTP against a real server (waitress, libvirt's built-in ``test:///default`` host), on SQLite
and (slow) on a real PostgreSQL and MariaDB.

Runs on the test host fail (it has no disks to read): that is what the wrong-state cases use.
The full job → run → restore cycle on real guests is in test_service_cycle.py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from raksha_server import Client, Server

from raksha.api import openapi_spec
from raksha.api.schemas import views

ROOT = Path(__file__).resolve().parents[2]
VM = "test"  # the domain libvirt's test driver always has


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow),
                                        pytest.param("mariadb", marks=pytest.mark.slow)])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The embedded server on SQLite (its default), and on a real PostgreSQL and MariaDB (a fresh database on
    the server scripts/start-postgres.sh or start-mariadb.sh starts)."""
    with contextlib.ExitStack() as stack:
        overrides = {}
        if request.param != "sqlite":
            fresh = request.getfixturevalue("fresh_db")
            overrides["database__connection"] = stack.enter_context(
                fresh(request.getfixturevalue(f"{'postgres' if request.param == 'postgresql' else 'mariadb'}_server")))
        srv = stack.enter_context(Server(tmp_path_factory.mktemp("raksha-api"), **overrides))
        yield srv


@pytest.fixture
def t1(server: Server) -> Client:
    return server.client("tenant-1")


def _job(client: Client, name: str = "web", **extra: object) -> dict[str, object]:
    resp = client.post("/backupjobs", {"backupjob": {"name": name, "vms": [{"id": VM}], **extra}})
    assert resp.status == 201, resp
    jsonschema.validate(resp.body, views.wrapped("backupjob", views.BACKUPJOB))
    return dict(resp.body["backupjob"])


def test_versions_document_and_the_checked_in_openapi_document(server: Server) -> None:
    client = server.client()
    assert client.get("/").body["versions"][0]["id"] == "v1.0"
    served = client.get("/openapi.json").body
    assert served == openapi_spec.build()
    checked_in = json.loads((ROOT / "docs" / "api" / "openapi.json").read_text())
    assert checked_in == json.loads(json.dumps(served)), "docs/api/openapi.json is stale: run scripts/gen-openapi.py"


def test_every_route_is_documented_and_every_documented_operation_is_routed(server: Server) -> None:
    from raksha.api.urls import routes

    doc = openapi_spec.build()["paths"]
    routed = {(m.lower(), p) for m, p, _ in routes()}
    documented = {(m, p) for p, ops in doc.items() for m in ops}
    assert routed == documented


def test_job_create_show_update_list_and_delete(t1: Client) -> None:
    job = _job(t1, "crud", description="nightly", retention={"keep_last": 3},
               schedule={"interval_hours": 24, "full_every": 7})
    assert job["vms"] == [{"id": VM, "exclude_disks": []}]
    assert job["schedule"]["interval_hours"] == 24 and job["hours"] == 24 and job["retention"] == {"keep_last": 3}
    shown = t1.get(f"/backupjobs/{job['id']}")
    assert shown.status == 200 and shown.body["backupjob"]["name"] == "crud"
    upd = t1.put(f"/backupjobs/{job['id']}", {"backupjob": {"description": "hourly", "schedule": None}})
    assert upd.status == 200 and upd.body["backupjob"]["description"] == "hourly"
    assert upd.body["backupjob"]["schedule"] is None
    assert job["id"] in [j["id"] for j in t1.get("/backupjobs").body["backupjobs"]]
    assert t1.delete(f"/backupjobs/{job['id']}").status == 204
    gone = t1.get(f"/backupjobs/{job['id']}")
    assert gone.status == 404 and gone.body["error"]["code"] == "BACKUPJOB_NOT_FOUND"


@pytest.mark.parametrize("level", ["crash", "filesystem", "application"])
def test_a_jobs_wanted_consistency_is_created_updated_shown_and_cleared(t1: Client, level: str) -> None:
    job = _job(t1, f"wants-{level}", consistency=level)
    assert job["consistency"] == level
    assert t1.get(f"/backupjobs/{job['id']}").body["backupjob"]["consistency"] == level
    listed = {j["id"]: j for j in t1.get(f"/backupjobs?name=wants-{level}").body["backupjobs"]}
    assert listed[job["id"]]["consistency"] == level
    other = next(lv for lv in ("crash", "filesystem", "application") if lv != level)
    upd = t1.put(f"/backupjobs/{job['id']}", {"backupjob": {"consistency": other}})
    assert upd.status == 200, upd
    jsonschema.validate(upd.body, views.wrapped("backupjob", views.BACKUPJOB))
    assert upd.body["backupjob"]["consistency"] == other
    # Another field's update leaves it alone; null sets it back to the best each VM reaches.
    assert t1.put(f"/backupjobs/{job['id']}", {"backupjob": {"description": "x"}}).body["backupjob"][
        "consistency"] == other
    cleared = t1.put(f"/backupjobs/{job['id']}", {"backupjob": {"consistency": None}})
    assert cleared.status == 200 and cleared.body["backupjob"]["consistency"] is None
    assert t1.get(f"/backupjobs/{job['id']}").body["backupjob"]["consistency"] is None


def test_a_job_without_a_wanted_consistency_shows_null(t1: Client) -> None:
    assert _job(t1, "best")["consistency"] is None


@pytest.mark.parametrize("bad", ["Crash", "none", "", 1, True, ["crash"]])
def test_an_unknown_consistency_is_refused_on_create_and_update(t1: Client, bad: object) -> None:
    made = t1.post("/backupjobs", {"backupjob": {"name": "x", "vms": [{"id": VM}], "consistency": bad}})
    assert made.status == 400 and made.body["error"]["code"] == "BODY_INVALID", made
    assert "backupjob/consistency" in made.body["error"]["message"]
    job = _job(t1, "stays", consistency="crash")
    upd = t1.put(f"/backupjobs/{job['id']}", {"backupjob": {"consistency": bad}})
    assert upd.status == 400 and upd.body["error"]["code"] == "BODY_INVALID", upd
    assert t1.get(f"/backupjobs/{job['id']}").body["backupjob"]["consistency"] == "crash"


def test_pagination_follows_next_links_and_filters(t1: Client) -> None:
    ids = {_job(t1, "page")["id"] for _ in range(3)}
    seen: list[str] = []
    resp = t1.get("/backupjobs?name=page&limit=2")
    while True:
        assert resp.status == 200, resp
        seen += [j["id"] for j in resp.body["backupjobs"]]
        nxt = [link["href"] for link in resp.body["backupjobs_links"] if link["rel"] == "next"]
        if not nxt:
            break
        resp = Client(nxt[0].split("/v1/")[0]).get("/v1/" + nxt[0].split("/v1/")[1])
    assert set(seen) == ids and len(seen) == 3
    bad = t1.get("/backupjobs?limit=0")
    assert bad.status == 400 and bad.body["error"]["code"] == "QUERY_INVALID"
    assert t1.get("/backupjobs?colour=red").body["error"]["code"] == "QUERY_INVALID"


@pytest.mark.parametrize(("raw", "code"), [
    (b"", "BODY_REQUIRED"),
    (b"{not json", "BODY_NOT_JSON"),
    (b"[]", "BODY_INVALID"),
    (b'{"job": {}}', "BODY_INVALID"),
    (b'{"backupjob": {"name": ""}}', "BODY_INVALID"),
    (b'{"backupjob": {"name": "x"}}', "BODY_INVALID"),
    (b'{"backupjob": {"name": "x", "vms": []}}', "BODY_INVALID"),
    (b'{"backupjob": {"name": "x", "vms": [{"id": "test"}], "colour": 1}}', "BODY_INVALID"),
    (b'{"backupjob": {"name": "x", "vms": [{"id": "test"}], "schedule": {"cron": "every day!"}}}', "SCHEDULE_INVALID"),
    (b'{"backupjob": {"name": "x", "vms": [{"id": "test"}], "retention": {"keep_last": -1}}}', "BODY_INVALID"),
    (b'{"backupjob": {"name": "x", "vms": [{"id": "no-such-vm"}]}}', "VM_NOT_FOUND"),
    (b'{"backupjob": {"name": "x", "vms": [{"id": "test"}], "vault_service": "nope"}}', "VAULT_SERVICE_NOT_FOUND"),
    # PostgreSQL cannot store a NUL character: refused alike on every backend, never a 500
    (b'{"backupjob": {"name": "a\\u0000b", "vms": [{"id": "test"}]}}', "VALUE_INVALID"),
    (b'{"backupjob": {"name": "x", "vms": [{"id": "te\\u0000st"}]}}', "VALUE_INVALID"),
])
def test_bad_bodies_get_400_with_a_stable_code(t1: Client, raw: bytes, code: str) -> None:
    resp = t1.request("POST", "/backupjobs", raw=raw)
    assert resp.status == 400, resp
    assert resp.body["error"]["code"] == code
    jsonschema.validate(resp.body, views.ERROR)


def test_unknown_paths_methods_and_ids(t1: Client) -> None:
    assert t1.get("/nothing").body["error"]["code"] == "RESOURCE_NOT_FOUND"
    resp = t1.put("/backupjobs", {})
    assert resp.status == 405 and resp.body["error"]["code"] == "METHOD_NOT_ALLOWED"
    for path in ("/backupjobs/0000", "/backupjobruns/0000", "/backupjobs/0000/backupjobsruns", "/restores/0000"):
        resp = t1.get(path)
        assert resp.status == 404, (path, resp)
        assert resp.body["error"]["code"].endswith("_NOT_FOUND")


def test_values_a_database_cannot_keep_are_refused_alike_on_every_backend(server: Server, t1: Client) -> None:
    for path in ("/backupjobs/%00", "/backupjobs?name=%00", "/restores?status=a%00"):
        resp = t1.get(path)
        assert resp.status == 400 and resp.body["error"]["code"] == "VALUE_INVALID", (path, resp)
    job = _job(t1, "nul")
    resp = t1.put(f"/backupjobs/{job['id']}", {"backupjob": {"description": "a\u0000"}})
    assert resp.status == 400 and resp.body["error"]["code"] == "VALUE_INVALID", resp
    long_tenant = server.client("t" * 256)
    for resp in (long_tenant.get("/backupjobs"),
                 long_tenant.post("/backupjobs", {"backupjob": {"name": "x", "vms": [{"id": VM}]}})):
        assert resp.status == 400 and resp.body["error"]["code"] == "PROJECT_ID_INVALID", resp
    assert server.client("t" * 255).get("/backupjobs").status == 200
    assert _job(t1, "\U0001f600" * 255)["name"] == "\U0001f600" * 255  # 255 characters, not bytes


def test_no_tenant_sees_or_touches_another_tenants_job(server: Server, t1: Client) -> None:
    job = _job(t1, "private")
    t2 = server.client("tenant-2")
    assert t2.get(f"/backupjobs/{job['id']}").status == 404
    assert t2.delete(f"/backupjobs/{job['id']}").status == 404
    assert t2.post(f"/backupjobs/{job['id']}/full").status == 404
    assert job["id"] not in [j["id"] for j in t2.get("/backupjobs").body["backupjobs"]]
    # The 2013 client's project header must match the path's tenant.
    forged = server.client("tenant-1", headers={"X-Auth-Project-Id": "tenant-2"}).get("/backupjobs")
    assert forged.status == 403 and forged.body["error"]["code"] == "PROJECT_MISMATCH"


def test_a_failed_run_is_reported_and_cannot_be_restored(t1: Client) -> None:
    job = _job(t1, "fails")  # the test host has no disks to read
    resp = t1.post(f"/backupjobs/{job['id']}/full")
    assert resp.status == 202, resp
    run = resp.body["backupjobrun"]
    assert run["status"] == "queued" and run["type"] == "full"
    run = t1.wait(f"/backupjobs/{job['id']}/backupjobsruns/{run['id']}", "backupjobrun",
                  until=("available", "partial", "error"), timeout=60)
    jsonschema.validate(run, views.BACKUPJOBRUN)
    assert run["status"] == "error"
    assert run["vms"][0]["status"] == "error" and run["vms"][0]["error"]["code"]
    again = t1.post(f"/backupjobs/{job['id']}/backupjobsruns/{run['id']}", {"restore": {"type": "files"}})
    assert again.status == 409 and again.body["error"]["code"] == "RUN_NOT_RESTORABLE"
    # Both spellings reach the same run; the top-level 2013 paths too.
    for path in (f"/backupjobs/{job['id']}/backupjobruns/{run['id']}", f"/backupjobruns/{run['id']}",
                 f"/backupjobsruns/{run['id']}"):
        assert t1.get(path).body["backupjobrun"]["id"] == run["id"]
    assert t1.put(f"/backupjobruns/{run['id']}", {"backupjobrun": {"description": "x"}}).status == 200
    assert t1.delete(f"/backupjobs/{job['id']}/backupjobsruns/{run['id']}").status == 204
    assert t1.get(f"/backupjobruns/{run['id']}").status == 404


def test_one_run_of_a_job_at_a_time_and_cancel(t1: Client) -> None:
    job = _job(t1, "busy")
    first = t1.post(f"/backupjobs/{job['id']}/full").body["backupjobrun"]
    second = t1.post(f"/backupjobs/{job['id']}/incremental")
    if second.status == 202:  # the first had already failed on the test host: the lock was free again
        second_run = second.body["backupjobrun"]
        assert second_run["type"] == "full"  # nothing available to build on
    else:
        assert second.status == 409 and second.body["error"]["code"] == "JOB_BUSY"
    t1.wait(f"/backupjobruns/{first['id']}", "backupjobrun", until=("error", "cancelled"), timeout=60)
    late = t1.post(f"/backupjobruns/{first['id']}/cancel")
    assert late.status == 409 and late.body["error"]["code"] == "RUN_FINISHED"


def test_the_2013_client_dialect(server: Server) -> None:
    old = server.client("tenant-3", headers={"X-Auth-Token": "ignored-in-embedded-mode",
                                             "X-Auth-Project-Id": "tenant-3"})
    resp = old.post("/backupjobs", {"backupjob": {"instance_id": VM, "vault_service": "local", "name": "legacy",
                                                  "description": "from 2013", "hours": 6}})
    assert resp.status == 201, resp
    job = resp.body["backupjob"]
    for field in ("id", "status", "name", "description", "vm_id", "vault_service", "size", "created_at",
                  "fail_reason"):
        assert field in job
    assert job["vm_id"] == VM and job["hours"] == 6
    detail = old.get("/backupjobs/detail").body["backupjobs"]
    assert [j["id"] for j in detail] == [job["id"]]
    prepared = old.post(f"/backupjobs/{job['id']}?prepare=1")
    assert prepared.status == 202 and prepared.body["backupjobrun"]["status"] == "prepared"
    jsonschema.validate(prepared.body["backupjobrun"], views.PREPARED_RUN)
    ran = old.post(f"/backupjobs/{job['id']}")
    assert ran.status == 202 and ran.body["backupjobrun"]["type"] == "full"
    run_id = ran.body["backupjobrun"]["id"]
    assert run_id in [r["id"] for r in old.get("/backupjobruns").body["backupjobruns"]]
    assert run_id in [r["id"] for r in old.get("/backupjobruns/detail").body["backupjobruns"]]
    old.wait(f"/backupjobruns/{run_id}", "backupjobrun", until=("error", "available"), timeout=60)
    assert old.post(f"/backupjobruns/{run_id}").body["error"]["code"] == "RUN_NOT_RESTORABLE"
    assert old.delete(f"/backupjobruns/{run_id}").status == 204
