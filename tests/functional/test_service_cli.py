"""``raksha job|run|restore``: the service's CLI as a user runs it (a subprocess), against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from raksha_server import Server
from tls_front import TlsFront


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("raksha-cli")) as srv:
        yield srv


def raksha(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAKSHA_URL": server.url, "RAKSHA_PROJECT": "cli"}
    return subprocess.run([sys.executable, "-m", "raksha.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_job_lifecycle_through_the_cli(server: Server) -> None:
    made = raksha(server, "job", "create", "nightly", "--vm", "test", "--interval-hours", "24", "--keep-last", "7",
                  "--json")
    assert made.returncode == 0, made.stderr
    job = json.loads(made.stdout)
    assert job["name"] == "nightly" and job["retention"] == {"keep_last": 7}
    listed = raksha(server, "job", "list")
    assert listed.returncode == 0 and job["id"] in listed.stdout and "nightly" in listed.stdout
    shown = raksha(server, "job", "show", job["id"])
    assert "every 24 h" in shown.stdout and "keep_last=7" in shown.stdout
    # The test host has no disks: the run fails, --wait says so in the exit status and names the error.
    ran = raksha(server, "job", "full", job["id"], "--wait")
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "full error" in ran.stdout
    run_id = ran.stdout.split()[1]
    assert run_id in raksha(server, "run", "list", "--job", job["id"]).stdout
    refused = raksha(server, "restore", "start", run_id)
    assert refused.returncode == 1 and "[RUN_NOT_RESTORABLE]" in refused.stderr
    assert raksha(server, "run", "delete", run_id).returncode == 0
    assert raksha(server, "job", "delete", job["id"]).returncode == 0
    gone = raksha(server, "job", "show", job["id"])
    assert gone.returncode == 4 and "[BACKUPJOB_NOT_FOUND]" in gone.stderr


def test_clear_errors_for_bad_arguments_and_an_unreachable_server(server: Server, tmp_path: Path) -> None:
    bad = raksha(server, "job", "create", "x", "--vm", "test", "--exclude", "novm")
    assert bad.returncode == 2 and "[USAGE]" in bad.stderr
    missing = raksha(server, "job", "create", "x", "--vm", "ghost")
    assert missing.returncode == 2 and "[VM_NOT_FOUND]" in missing.stderr
    down = subprocess.run([sys.executable, "-m", "raksha.cli.main", "job", "list", "--url", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "[SERVER_UNREACHABLE]" in down.stderr


def test_job_consistency_flag_on_create_and_update(server: Server) -> None:
    made = raksha(server, "job", "create", "crashy", "--vm", "test", "--consistency", "crash", "--json")
    assert made.returncode == 0, made.stderr
    job = json.loads(made.stdout)
    assert job["consistency"] == "crash"
    shown = raksha(server, "job", "show", job["id"])
    assert shown.returncode == 0 and "consistency" in shown.stdout and "crash" in shown.stdout
    for level in ("filesystem", "application"):
        upd = raksha(server, "job", "update", job["id"], "--consistency", level, "--json")
        assert upd.returncode == 0, upd.stderr
        assert json.loads(upd.stdout)["consistency"] == level
    best = raksha(server, "job", "update", job["id"], "--consistency", "best", "--json")
    assert best.returncode == 0 and json.loads(best.stdout)["consistency"] is None
    assert "best each VM reaches" in raksha(server, "job", "show", job["id"]).stdout
    plain = raksha(server, "job", "create", "plain", "--vm", "test", "--json")
    assert plain.returncode == 0 and json.loads(plain.stdout)["consistency"] is None
    for cmd in (["job", "create", "x", "--vm", "test"], ["job", "update", job["id"]]):
        bad = raksha(server, *cmd, "--consistency", "paranoid")
        assert bad.returncode == 2 and "paranoid" in bad.stderr, bad.stderr
    assert raksha(server, "job", "delete", job["id"]).returncode == 0


def test_an_https_api_is_verified_against_the_ca_given(server: Server, tmp_path: Path) -> None:
    """Behind a TLS-terminating front with a private CA: --cacert (or $RAKSHA_CACERT) verifies it; without it
    the CLI refuses with TLS_VERIFY_FAILED and says what to do; --insecure skips the check."""
    made = raksha(server, "job", "create", "over-tls", "--vm", "test", "--json")
    assert made.returncode == 0, made.stderr
    with TlsFront(server.url, tmp_path) as front:
        ok = raksha(server, "job", "show", json.loads(made.stdout)["id"], "--url", front.url,
                    "--cacert", str(front.cert), "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["name"] == "over-tls"
        refused = raksha(server, "job", "list", "--url", front.url)
        assert refused.returncode == 1 and "[TLS_VERIFY_FAILED]" in refused.stderr, refused.stderr
        assert "--cacert" in refused.stderr
        assert raksha(server, "job", "list", "--url", front.url, "--insecure").returncode == 0
        env = {**os.environ, "RAKSHA_URL": front.url, "RAKSHA_PROJECT": "cli", "RAKSHA_CACERT": str(front.cert)}
        by_env = subprocess.run([sys.executable, "-m", "raksha.cli.main", "job", "list", "--json"], env=env,
                                capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert by_env.returncode == 0 and "over-tls" in by_env.stdout, by_env.stderr
    bad_ca = raksha(server, "job", "list", "--url", "https://127.0.0.1:9", "--cacert", str(tmp_path / "none.pem"))
    assert bad_ca.returncode == 2 and "[CACERT_INVALID]" in bad_ca.stderr, bad_ca.stderr
