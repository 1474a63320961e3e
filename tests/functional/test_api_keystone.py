"""The API behind keystonemiddleware's ``auth_token`` with a real Keystone (scripts/start-keystone.sh: pip
``keystone``, SQLite, fernet tokens, on loopback), real tokens, and oslo.policy's defaults and a policy file.

Tenant isolation: a token's project must be the path's ``{tenant_id}`` (403 PROJECT_MISMATCH), and no project
ever sees another's jobs. Roles: readers look, members act (403 POLICY_DENIED otherwise). Runs use libvirt's
``test:///default`` host, so no VM is needed (its runs fail: they have no disks to read).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")
pytest.importorskip("keystonemiddleware", reason="keystonemiddleware is a dependency (scripts/setup.sh)")
pytest.importorskip("schemathesis", reason="schemathesis is in the test extra (scripts/setup.sh)")

import schemathesis
from hypothesis import HealthCheck, Phase, settings
from raksha_server import Client, Server
from schemathesis.specs.openapi.checks import positive_data_acceptance

from raksha.api import openapi_spec
from raksha.api.schemas import views

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
VM = "test"
PASSWORD = "raksha-test-pw"  # the accounts scripts/start-keystone.sh makes
A, B = "raksha-test-a", "raksha-test-b"


@pytest.fixture(scope="module")
def keystone() -> str:
    done = subprocess.run([str(REPO / "scripts" / "start-keystone.sh")], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        if os.geteuid() != 0 and "not root" in done.stderr:
            pytest.skip(done.stderr.strip())
        pytest.fail(f"start-keystone.sh failed (exit {done.returncode}):\n{done.stderr}")
    return done.stdout.strip().splitlines()[-1]


class Token:
    def __init__(self, endpoint: str, user: str, project: str) -> None:
        body = {"auth": {
            "identity": {"methods": ["password"],
                         "password": {"user": {"name": user, "domain": {"id": "default"}, "password": PASSWORD}}},
            "scope": {"project": {"name": project, "domain": {"id": "default"}}}}}
        req = urllib.request.Request(f"{endpoint}/auth/tokens", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            self.id: str = resp.headers["X-Subject-Token"]
            token: dict[str, Any] = json.loads(resp.read())["token"]
        self.project_id: str = token["project"]["id"]
        self.project_name: str = token["project"]["name"]
        self.roles = sorted(r["name"] for r in token["roles"])


def keystone_overrides(endpoint: str) -> dict[str, Any]:
    return {
        "api__auth_strategy": "keystone",
        "keystone_authtoken__www_authenticate_uri": endpoint,
        "keystone_authtoken__auth_url": endpoint,
        "keystone_authtoken__auth_type": "password",
        "keystone_authtoken__username": "raksha",
        "keystone_authtoken__password": "raksha-service-pw",
        "keystone_authtoken__project_name": "service",
        "keystone_authtoken__user_domain_name": "Default",
        "keystone_authtoken__project_domain_name": "Default",
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keystone: str) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("raksha-keystone"), **keystone_overrides(keystone)) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokens(keystone: str) -> dict[str, Token]:
    return {"a_member": Token(keystone, "raksha-a-member", A), "a_reader": Token(keystone, "raksha-a-reader", A),
            "b_member": Token(keystone, "raksha-b-member", B)}


def as_user(server: Server, token: Token, tenant: str | None = None, **headers: str) -> Client:
    """A client for ``/v1/<tenant>`` (the token's own project unless told) that sends the token."""
    return server.client(tenant or token.project_id, headers={"X-Auth-Token": token.id, **headers})


def assert_error(resp: Any, status: int, code: str) -> None:
    assert resp.status == status, resp
    jsonschema.validate(resp.body, views.ERROR)
    assert resp.body["error"]["code"] == code, resp


def _job(client: Client, name: str) -> dict[str, Any]:
    resp = client.post("/backupjobs", {"backupjob": {"name": name, "vms": [{"id": VM}]}})
    assert resp.status == 201, resp
    return dict(resp.body["backupjob"])


def test_the_test_accounts_carry_keystones_implied_roles(tokens: dict[str, Token]) -> None:
    assert tokens["a_member"].roles == ["member", "reader"]  # bootstrap: member implies reader
    assert tokens["a_reader"].roles == ["reader"]
    assert tokens["a_member"].project_id == tokens["a_reader"].project_id != tokens["b_member"].project_id


def test_no_token_or_a_bad_token_is_401_as_json(server: Server, tokens: dict[str, Token], keystone: str) -> None:
    tenant = tokens["a_member"].project_id
    for headers in ({}, {"X-Auth-Token": "not-a-token"}, {"X-Auth-Token": tokens["a_member"].id[:-4] + "AAAA"}):
        for method, path in (("GET", "/backupjobs"), ("POST", "/backupjobs"), ("GET", "/restores/x")):
            resp = server.client(tenant, headers=headers).request(method, path, {"backupjob": {"name": "x"}})
            assert_error(resp, 401, "AUTH_REQUIRED")
            assert resp.headers["Content-Type"].startswith("application/json")
            challenge = {k.lower(): v for k, v in resp.headers.items()}.get("www-authenticate", "")
            assert challenge == f'Keystone uri="{keystone}"', resp.headers
    # Identity headers a caller forges are dropped by auth_token, never trusted.
    forged = server.client(tenant, headers={"X-Identity-Status": "Confirmed", "X-Project-Id": tenant,
                                            "X-Roles": "admin"}).get("/backupjobs")
    assert_error(forged, 401, "AUTH_REQUIRED")
    # The versions and OpenAPI documents need no token, as in any OpenStack API.
    assert server.client().get("/").status == 200
    assert server.client().get("/openapi.json").status == 200


def test_a_member_acts_in_its_project_and_never_reaches_another(server: Server, tokens: dict[str, Token]) -> None:
    a, b = tokens["a_member"], tokens["b_member"]
    member_a, member_b = as_user(server, a), as_user(server, b)
    job_a, job_b = _job(member_a, "a-job"), _job(member_b, "b-job")
    assert job_a["project_id"] == a.project_id and job_a["user_id"]
    run = member_a.post(f"/backupjobs/{job_a['id']}/full")
    assert run.status == 202, run
    run_id = run.body["backupjobrun"]["id"]
    member_a.wait(f"/backupjobruns/{run_id}", "backupjobrun", until=("error", "available", "partial"), timeout=60)
    assert [j["id"] for j in member_a.get("/backupjobs").body["backupjobs"]] == [job_a["id"]]
    assert run_id in [r["id"] for r in member_a.get(f"/backupjobs/{job_a['id']}/backupjobsruns").body["backupjobruns"]]
    assert member_a.put(f"/backupjobs/{job_a['id']}", {"backupjob": {"description": "mine"}}).status == 200

    # A's token on B's path: refused whatever the call, before any lookup.
    on_b = as_user(server, a, tenant=b.project_id)
    for method, path, body in (("GET", "/backupjobs", None), ("GET", f"/backupjobs/{job_b['id']}", None),
                               ("POST", "/backupjobs", {"backupjob": {"name": "x", "vms": [{"id": VM}]}}),
                               ("DELETE", f"/backupjobs/{job_b['id']}", None),
                               ("POST", f"/backupjobs/{job_b['id']}/full", None),
                               ("GET", "/backupjobruns", None), ("GET", "/restores", None)):
        assert_error(on_b.request(method, path, body), 403, "PROJECT_MISMATCH")
    # B's ids on A's own path: they do not exist for A.
    assert_error(member_a.get(f"/backupjobs/{job_b['id']}"), 404, "BACKUPJOB_NOT_FOUND")
    assert_error(member_a.delete(f"/backupjobs/{job_b['id']}"), 404, "BACKUPJOB_NOT_FOUND")
    assert_error(member_a.post(f"/backupjobs/{job_b['id']}/full"), 404, "BACKUPJOB_NOT_FOUND")
    # And B never sees A's job or run.
    assert [j["id"] for j in member_b.get("/backupjobs").body["backupjobs"]] == [job_b["id"]]
    assert member_b.get("/backupjobruns").body["backupjobruns"] == []
    assert_error(member_b.get(f"/backupjobruns/{run_id}"), 404, "BACKUPJOBRUN_NOT_FOUND")
    assert member_a.delete(f"/backupjobruns/{run_id}").status == 204
    assert member_a.delete(f"/backupjobs/{job_a['id']}").status == 204


def test_a_reader_looks_but_may_not_act(server: Server, tokens: dict[str, Token]) -> None:
    member, reader = as_user(server, tokens["a_member"]), as_user(server, tokens["a_reader"])
    job = _job(member, "watched")
    run_id = member.post(f"/backupjobs/{job['id']}/full").body["backupjobrun"]["id"]
    member.wait(f"/backupjobruns/{run_id}", "backupjobrun", until=("error", "available", "partial"), timeout=60)
    assert job["id"] in [j["id"] for j in reader.get("/backupjobs").body["backupjobs"]]
    assert reader.get(f"/backupjobs/{job['id']}").status == 200
    assert reader.get(f"/backupjobs/{job['id']}/backupjobsruns/{run_id}").status == 200
    assert reader.get("/backupjobruns/detail").status == 200 and reader.get("/restores").status == 200
    for method, path, body in (
        ("POST", "/backupjobs", {"backupjob": {"name": "x", "vms": [{"id": VM}]}}),
        ("PUT", f"/backupjobs/{job['id']}", {"backupjob": {"name": "y"}}),
        ("DELETE", f"/backupjobs/{job['id']}", None),
        ("POST", f"/backupjobs/{job['id']}/full", None),
        ("POST", f"/backupjobs/{job['id']}/incremental", None),
        ("POST", f"/backupjobs/{job['id']}", None),
        ("POST", f"/backupjobs/{job['id']}/backupjobsruns/{run_id}", {"restore": {"type": "files"}}),
        ("POST", f"/backupjobruns/{run_id}", None),
        ("DELETE", f"/backupjobruns/{run_id}", None),
        ("POST", f"/backupjobruns/{run_id}/cancel", None),
    ):
        assert_error(reader.request(method, path, body), 403, "POLICY_DENIED")
    assert reader.get(f"/backupjobs/{job['id']}").body["backupjob"]["name"] == "watched"


def test_the_2013_clients_headers(server: Server, tokens: dict[str, Token]) -> None:
    a = tokens["a_member"]
    for claimed in (a.project_id, a.project_name):
        old = as_user(server, a, **{"X-Auth-Project-Id": claimed})
        resp = old.post("/backupjobs", {"backupjob": {"instance_id": VM, "vault_service": "local",
                                                      "name": "legacy", "description": "2013", "hours": 6}})
        assert resp.status == 201, resp
        assert resp.body["backupjob"]["vm_id"] == VM
        assert resp.body["backupjob"]["id"] in [j["id"] for j in old.get("/backupjobs/detail").body["backupjobs"]]
    # A project header that is not the token's is refused, even on the token's own path.
    wrong = as_user(server, a, **{"X-Auth-Project-Id": tokens["b_member"].project_id})
    assert_error(wrong.get("/backupjobs"), 403, "PROJECT_MISMATCH")


def test_a_policy_file_overrides_the_defaults(tmp_path: Path, keystone: str, tokens: dict[str, Token]) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text('"raksha:backupjob:create": "role:reader"\n"raksha:backupjob:list": "role:admin"\n')
    with Server(tmp_path / "data", **keystone_overrides(keystone), api__policy_file=str(policy)) as srv:
        reader = as_user(srv, tokens["a_reader"])
        assert reader.post("/backupjobs", {"backupjob": {"name": "by-reader", "vms": [{"id": VM}]}}).status == 201
        assert_error(reader.get("/backupjobs"), 403, "POLICY_DENIED")
        assert_error(as_user(srv, tokens["a_member"]).get("/backupjobs"), 403, "POLICY_DENIED")
        assert reader.get("/backupjobruns").status == 200  # the rules the file leaves alone keep their defaults


schema = schemathesis.openapi.from_dict(openapi_spec.build())


@schema.include(path_regex=r"^/v1/").parametrize()
@settings(max_examples=4, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
@pytest.mark.parametrize("who", ["a_member", "a_reader"])
def test_every_operation_keeps_its_contract_behind_keystone(case: Any, who: str, server: Server,
                                                            tokens: dict[str, Token]) -> None:
    """Fuzzed with a real token, on the token's own tenant: auth and policy refusals conform to the document too."""
    token = tokens[who]
    if "tenant_id" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "tenant_id": token.project_id}
    case.call_and_validate(base_url=server.url, headers={"X-Auth-Token": token.id}, timeout=30,
                           excluded_checks=[positive_data_acceptance])
