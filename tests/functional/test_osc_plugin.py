"""``openstack raksha ...``: the OpenStack client plugin (the ``osc`` extra) against a real embedded server.

The real ``openstack`` command, as a subprocess, finds the plugin through its entry points and talks
to the server over HTTP: with ``--os-auth-type none`` and ``--os-raksha-url``, and with an admin token
(``--os-auth-type admin_token``, formerly ``token_endpoint``) whose endpoint is the API.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("osc_lib", reason="the osc extra (pip install -e '.[osc]') is installed by scripts/setup.sh")
pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from raksha_server import Server
from tls_front import TlsFront

OPENSTACK = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "openstack"
VM = "test"  # the domain libvirt's test driver always has


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("raksha-osc")) as srv:
        yield srv


def openstack(*args: str, expect: int = 0) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "RAKSHA_"))}
    done = subprocess.run([str(OPENSTACK), *args], capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == expect, (args, done.returncode, done.stdout, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout, done.stderr


def noauth(server: Server, project: str) -> list[str]:
    return ["--os-auth-type", "none", "--os-raksha-url", server.url, "--os-raksha-project", project]


def test_openstack_raksha_job_list(server: Server) -> None:
    job = server.client("osc-1").post("/backupjobs", {"backupjob": {"name": "web", "vms": [{"id": VM}]}})
    assert job.status == 201, job
    out, _ = openstack(*noauth(server, "osc-1"), "raksha", "job", "list", "-f", "json")
    assert json.loads(out) == [{"ID": job.body["backupjob"]["id"], "Name": "web", "Status": "available",
                                "VMs": VM, "Last Run": ""}]



def test_openstack_verifies_an_https_api_with_os_cacert(server: Server, tmp_path: Path) -> None:
    """osc-lib's --os-cacert and --insecure reach the plugin's client (a TLS front with a private CA)."""
    server.client("osc-tls").post("/backupjobs", {"backupjob": {"name": "tls", "vms": [{"id": VM}]}})
    with TlsFront(server.url, tmp_path) as front:
        args = ["--os-auth-type", "none", "--os-raksha-url", front.url, "--os-raksha-project", "osc-tls"]
        out, _ = openstack(*args, "--os-cacert", str(front.cert), "raksha", "job", "list", "-f", "json")
        assert [j["Name"] for j in json.loads(out)] == ["tls"]
        _, err = openstack(*args, "raksha", "job", "list", expect=1)
        assert "TLS_VERIFY_FAILED" in err, err
        out, _ = openstack(*args, "--insecure", "raksha", "job", "list", "-f", "json")
        assert [j["Name"] for j in json.loads(out)] == ["tls"]

@pytest.mark.slow
def test_jobs_runs_and_restores_through_openstack(server: Server) -> None:
    admin = ["--os-auth-type", "admin_token", "--os-endpoint", f"{server.url}/v1", "--os-token", "t",
             "--os-raksha-project", "osc-2"]
    out, _ = openstack(*admin, "raksha", "job", "create", "nightly", "--vm", VM, "--interval-hours", "24",
                       "--keep-last", "3", "--consistency", "filesystem", "-f", "json")
    job: dict[str, Any] = json.loads(out)
    assert job["name"] == "nightly" and json.loads(job["retention"]) == {"keep_last": 3}
    assert job["consistency"] == "filesystem"
    out, _ = openstack(*admin, "raksha", "job", "show", job["id"], "-f", "json")
    assert json.loads(out)["id"] == job["id"]
    # A run on the test host fails (it has no disks): --wait says so with the API's reason.
    _, err = openstack(*admin, "raksha", "job", "full", job["id"], "--wait", "-f", "json", expect=1)
    assert "ended error" in err
    out, _ = openstack(*admin, "raksha", "run", "list", "--job", job["id"], "-f", "json")
    (run,) = json.loads(out)
    assert run["Type"] == "full" and run["Status"] == "error"
    _, err = openstack(*admin, "raksha", "restore", "create", run["ID"], "--type", "files", expect=1)
    assert "RUN_NOT_RESTORABLE" in err
    out, _ = openstack(*admin, "raksha", "restore", "list", "-f", "json")
    assert json.loads(out) == []
    openstack(*admin, "raksha", "run", "delete", run["ID"])
    openstack(*admin, "raksha", "job", "delete", job["id"])
    _, err = openstack(*noauth(server, "osc-2"), "raksha", "job", "show", job["id"], expect=1)
    assert "BACKUPJOB_NOT_FOUND" in err
    # Another project sees none of it.
    out, _ = openstack(*noauth(server, "osc-3"), "raksha", "job", "list", "-f", "json")
    assert json.loads(out) == []


def test_every_command_is_registered_and_its_options_parse() -> None:
    from importlib.metadata import entry_points

    commands = {ep.name: ep.load() for ep in entry_points(group="openstack.raksha.v1")}
    assert {name.split("_", 1)[1].replace("_", " ") for name in commands} == {
        "job list", "job show", "job create", "job delete", "job run", "job full", "job incremental",
        "run list", "run show", "run delete", "run cancel",
        "restore create", "restore list", "restore show", "restore cancel"}
    for name, cls in commands.items():
        parser = cls(None, None).get_parser(f"openstack {name.replace('_', ' ')}")  # no conflicting options
        assert parser.description or cls.__doc__, name
    (plugin,) = [ep for ep in entry_points(group="openstack.cli.extension") if ep.name == "raksha"]
    assert plugin.load().API_NAME == "raksha"


KS_PASSWORD = "raksha-test-pw"  # the accounts scripts/start-keystone.sh makes


def _keystone_call(endpoint: str, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    import urllib.request

    req = urllib.request.Request(endpoint + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json", **({"X-Auth-Token": token}
                                                                                  if token else {})})
    with urllib.request.urlopen(req, timeout=30) as resp:
        payload = resp.read()
        return (json.loads(payload) if payload else None), resp.headers.get("X-Subject-Token")


@pytest.mark.slow
def test_openstack_with_keystone_tokens_and_the_catalog(tmp_path: Path) -> None:
    """Password auth against a real Keystone; the API found in the catalog (``data-protection``); the path's
    tenant is the token's project; keystonemiddleware and the policy judge the token."""
    pytest.importorskip("keystonemiddleware", reason="keystonemiddleware is a dependency (scripts/setup.sh)")
    done = subprocess.run([str(OPENSTACK.parents[2] / "scripts" / "start-keystone.sh")], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        pytest.skip(f"start-keystone.sh failed: {done.stderr[-500:]}")
    keystone = done.stdout.strip().splitlines()[-1]
    overrides = {"api__auth_strategy": "keystone", "keystone_authtoken__www_authenticate_uri": keystone,
                 "keystone_authtoken__auth_url": keystone, "keystone_authtoken__auth_type": "password",
                 "keystone_authtoken__username": "raksha", "keystone_authtoken__password": "raksha-service-pw",
                 "keystone_authtoken__project_name": "service", "keystone_authtoken__user_domain_name": "Default",
                 "keystone_authtoken__project_domain_name": "Default"}
    _, admin = _keystone_call(keystone, "POST", "/auth/tokens", {"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": "admin", "domain": {"id": "default"}, "password": "raksha-admin-pw"}}},
        "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}})
    with Server(tmp_path / "srv", **overrides) as srv:
        service, _ = _keystone_call(keystone, "POST", "/services", {"service": {
            "type": "data-protection", "name": f"raksha-osc-test-{os.getpid()}", "enabled": True}}, admin)
        sid = service["service"]["id"]
        try:
            _keystone_call(keystone, "POST", "/endpoints", {"endpoint": {
                "service_id": sid, "interface": "public", "url": f"{srv.url}/v1", "region_id": "RegionOne"}}, admin)

            def user(name: str, project: str) -> list[str]:
                return ["--os-auth-type", "password", "--os-auth-url", keystone, "--os-identity-api-version", "3",
                        "--os-username", name, "--os-password", KS_PASSWORD, "--os-project-name", project,
                        "--os-user-domain-id", "default", "--os-project-domain-id", "default",
                        "--os-region-name", "RegionOne"]

            out, _ = openstack(*user("raksha-a-member", "raksha-test-a"), "raksha", "job", "create", "ks", "--vm",
                               VM, "-f", "json")
            job = json.loads(out)
            out, _ = openstack(*user("raksha-a-reader", "raksha-test-a"), "raksha", "job", "list", "-f", "json")
            assert [j["ID"] for j in json.loads(out)] == [job["id"]]
            _, err = openstack(*user("raksha-a-reader", "raksha-test-a"), "raksha", "job", "delete", job["id"],
                               expect=1)
            assert "POLICY_DENIED" in err
            out, _ = openstack(*user("raksha-b-member", "raksha-test-b"), "raksha", "job", "list", "-f", "json")
            assert json.loads(out) == []
            _, err = openstack(*user("raksha-b-member", "raksha-test-b"), "raksha", "job", "show", job["id"],
                               expect=1)
            assert "BACKUPJOB_NOT_FOUND" in err
            openstack(*user("raksha-a-member", "raksha-test-a"), "raksha", "job", "delete", job["id"])
        finally:
            endpoints, _ = _keystone_call(keystone, "GET", f"/endpoints?service_id={sid}", token=admin)
            for ep in endpoints["endpoints"]:
                _keystone_call(keystone, "DELETE", f"/endpoints/{ep['id']}", token=admin)
            _keystone_call(keystone, "DELETE", f"/services/{sid}", token=admin)
