"""Schema-driven fuzzing (schemathesis 4.x) of every operation in /schema, as each role, against a live
`gpux serve`: no request may get a 5xx, and every 4xx must carry the one error shape
`{"error": {"code", "message", "field"?}}`.

Each operation runs in both of schemathesis's generation modes: positive (requests that fit the
schema, e.g. integers of any size where the schema says "integer") and negative (requests that break
it: wrong types, missing fields, bad formats). Generation is derandomized (hypothesis picks its seed
from the test), so a run is repeatable; the number of examples per operation and mode is bounded so
the file takes a few minutes on a 2-core machine. Websocket routes (/v1/feed, /v1/stream) are not in
OpenAPI and are not fuzzed here.

At the end each role's test prints the count of operations and cases it ran."""
from __future__ import annotations

import json
import os
from collections import Counter
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import requests
import schemathesis
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                              status_code_conformance)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.e2e.client import unique
from tests.support import ADMIN_KEY, start_server

# Random cases per operation and generation mode, on top of the coverage phase's; a deeper run:
# GPUX_FUZZ_EXAMPLES=200 pytest tests/e2e/test_schemathesis.py
EXAMPLES_PER_MODE = int(os.environ.get("GPUX_FUZZ_EXAMPLES", "12"))
ROLES = ("admin", "owner", "tenant", "agent")
# Streaming and ops routes: /metrics belongs to the ops work (its exposure is decided there); it
# is still fuzzed, it just answers text, not JSON.
TEXT_ROUTES = {"/metrics"}


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


# schemathesis's own checks that an answer matches the schema: its status is documented, its
# content type too, and its body validates against the documented schema for that status.
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]

@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, server_db):
    # A rate limit far above what the fuzzer sends: a 429 would hide what a request does.
    proc = start_server(tmp_path_factory.mktemp("fuzz"), database_url=server_db,
                        extra_env={"GPUX_RATE_LIMIT_PER_S": "100000", "GPUX_QUOTE_LIMIT_PER_S": "100000"})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keys(fuzz_server) -> dict[str, str]:
    """One key per role, with objects behind them so ids exist: an owner with a host (8 GPUs) and an
    offer, a tenant with money, an open bid and (once the auction ticks) a lease."""
    base = fuzz_server.base_url
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as admin:
        def account(role: str) -> dict:
            created = admin.post("/v1/accounts", json={"name": unique(role), "role": role})
            assert created.status_code == 201, created.text
            return created.json()

        owner, tenant = account("owner"), account("tenant")
        deposit = admin.post(f"/v1/accounts/{tenant['id']}/deposits",
                             json={"amount": "100000.00", "idempotency_key": unique("dep")})
        assert deposit.status_code == 201, deposit.text
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {owner['api_key']}"}, timeout=30) as o:
        host = o.post("/v1/hosts", json={"name": unique("host"), "fabric": "pod-a"}).json()
        agent_headers = {"Authorization": f"Bearer {host['agent_token']}"}
        inventory = {"gpus": [{"uuid": f"GPU-{host['id']:04d}-{i:04d}-fuzz", "model": "H100-80GB",
                               "memory_mb": 81559} for i in range(8)]}
        assert httpx.put(f"{base}/v1/agent/inventory", json=inventory, headers=agent_headers).status_code == 200
        now = datetime.now(timezone.utc)
        offer = o.post("/v1/offers", json={"host_id": host["id"], "gpus": 4, "floor_price": "1.00",
                                           "available_until": _iso(now + timedelta(days=2))})
        assert offer.status_code == 201, offer.text
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tenant['api_key']}"}, timeout=30) as t:
        for gpus, price in ((2, "3.00"), (8, "1.50")):  # one that fills, one that rests in the book
            bid = t.post("/v1/bids", json={"market": "H100-80GB/spot", "gpus": gpus, "duration_s": 3600,
                                           "limit_price": price, "client_order_id": unique("c")})
            assert bid.status_code == 201, bid.text
    return {"admin": ADMIN_KEY, "owner": owner["api_key"], "tenant": tenant["api_key"],
            "agent": host["agent_token"]}


def _error_shape_problem(response) -> str | None:
    """None when a 4xx body is {"error": {"code": str, "message": str, "field"?: str}}."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return "not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "no error object"
    if not isinstance(error.get("code"), str) or not isinstance(error.get("message"), str):
        return "error without code and message"
    if "field" in error and not isinstance(error["field"], str):
        return "field is not a string"
    return None


def _problem(response) -> str | None:
    if response.status_code >= 500:
        return f"server error {response.status_code}"
    if 400 <= response.status_code < 500:
        shape = _error_shape_problem(response)
        return f"{response.status_code} {shape}" if shape else None
    return None


@pytest.mark.timeout(600)
@pytest.mark.parametrize("role", ROLES)
def test_every_operation_as_each_role_never_gets_a_5xx(fuzz_server, keys, role: str) -> None:
    base = fuzz_server.base_url
    schema = schemathesis.openapi.from_url(f"{base}/schema/openapi.json")
    headers = {"Authorization": f"Bearer {keys[role]}"}
    session = requests.Session()
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    cases = 0
    def check(operation, phase: str, case) -> int:
        response = case.call(base_url=base, session=session, headers=headers, timeout=30)
        problem = _problem(response)
        if problem and not (response.status_code < 500 and case.path in TEXT_ROUTES):
            failures.append(f"{role} {operation.label} [{phase}]: {problem}\n"
                            f"    {case.as_curl_command(headers=headers)}\n    -> {response.content[:300]!r}")
        try:  # and the answer is what /schema says: a documented status, content type and body
            case.validate_response(response, checks=CONFORMANCE, headers=headers)
        except Exception as mismatch:  # schemathesis raises its failures (one, or a group)
            failures.append(f"{role} {operation.label} [{phase}]: not as /schema says: {mismatch}"[:1500])
        return response.status_code

    for operation in operations:
        # The coverage phase: boundary values of every parameter and field (the largest and
        # smallest integers, strings at and past their lengths, each field missing or of the wrong
        # type) and the methods the path does not declare. Deterministic by construction.
        generation = schema.config.generation_for(operation=operation, phase="coverage")
        for case in schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode),
                                               generation_config=generation):
            statuses[check(operation, "coverage", case)] += 1
            cases += 1
        # The fuzzing phase: random requests in each mode.
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            sent: list[int] = []

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                sent.append(check(operation, mode.value, case))

            try:
                run()
            except Unsatisfiable:
                pass  # no negative case exists (an operation without parameters or body)
            cases += len(sent)
            statuses.update(sent)
    print(f"\nschemathesis as {role}: {len(operations)} operations, {cases} cases, "
          f"statuses {dict(sorted(statuses.items()))}")
    assert len(operations) >= 30, "the schema lost its operations"
    assert not failures, f"{len(failures)} bad answers:\n" + "\n".join(failures[:40])
    # A refusal is the client's mistake: no traceback in the server's log for any of them.
    assert "Traceback" not in fuzz_server.log(), fuzz_server.log()[-3000:]
