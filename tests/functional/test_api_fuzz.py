"""The OpenAPI contract fuzzed with schemathesis against the running embedded server (noauth, ``test:///default``).

Every documented operation gets generated requests, valid and invalid; the server must never answer 5xx, every
answer must be one the document lists with a body that conforms to its schema, and invalid input must be refused
with a 4xx. Bounded: a few examples per operation, no shrinking, so the whole run stays well under two minutes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")
pytest.importorskip("schemathesis", reason="schemathesis is in the test extra (scripts/setup.sh)")

import schemathesis
from hypothesis import HealthCheck, Phase, settings
from raksha_server import Server
from schemathesis.specs.openapi.checks import positive_data_acceptance

from raksha.api import openapi_spec

EXAMPLES = int(os.environ.get("RAKSHA_FUZZ_EXAMPLES", "12"))
schema = schemathesis.openapi.from_dict(openapi_spec.build())
# Refusals by the server's own validation: a request the document calls valid must never get one.
SYNTAX_CODES = {"BODY_REQUIRED", "BODY_NOT_JSON", "BODY_INVALID", "QUERY_INVALID"}


def valid_requests_pass_validation(ctx: Any, response: Any, case: Any) -> None:
    """What the document calls valid passes the server's validation (the two agree on every rule).

    It may still name what does not exist (404), clash with a state (409) or break a rule no schema can
    state (400 with a domain code: an unknown VM, vault service or list marker). This stands in for
    schemathesis' positive_data_acceptance, which would count those as the server refusing valid data.
    """
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    assert response.status_code in (200, 201, 202, 204, 400, 404, 409), (
        f"a schema-valid request got {response.status_code}: {response.text[:300]}")
    if response.status_code == 400:
        code = response.json()["error"]["code"]
        assert code not in SYNTAX_CODES, f"the server's validation refused a valid request: {response.text[:300]}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("raksha-fuzz")) as srv:
        yield srv


@pytest.fixture(scope="module")
def existing(server: Server) -> dict[str, str]:
    """Path parameters that name a job and a (failed) run that exist."""
    fuzz = server.client("fuzz")
    job = fuzz.post("/backupjobs", {"backupjob": {"name": "fuzz", "vms": [{"id": "test"}]}})
    assert job.status == 201, job
    job_id = job.body["backupjob"]["id"]
    run = fuzz.post(f"/backupjobs/{job_id}/full")
    assert run.status == 202, run
    run_id = run.body["backupjobrun"]["id"]
    fuzz.wait(f"/backupjobruns/{run_id}", "backupjobrun", until=("error", "available", "partial"), timeout=60)
    return {"tenant_id": "fuzz", "id": job_id, "run_id": run_id}


def _check(case: Any, server: Server) -> None:
    case.call_and_validate(base_url=server.url, timeout=30, excluded_checks=[positive_data_acceptance],
                           additional_checks=[valid_requests_pass_validation])


BOUNDED = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                   phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


@pytest.mark.slow
@schema.parametrize()
@BOUNDED
def test_every_operation_keeps_its_contract(case: Any, server: Server) -> None:
    """Anything in every path parameter: mostly what does not exist, in tenants no one used."""
    _check(case, server)


@pytest.mark.slow
@schema.exclude(method="DELETE").parametrize()
@BOUNDED
def test_every_operation_on_things_that_exist_keeps_its_contract(case: Any, server: Server,
                                                                 existing: dict[str, str]) -> None:
    """The same on a job and a run that exist (deletes left out, so they stay): updates, runs, restores."""
    if case.path_parameters:
        case.path_parameters = {name: existing[name] for name in case.path_parameters}
    _check(case, server)
