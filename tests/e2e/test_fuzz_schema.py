"""Schema fuzzing: schemathesis generates requests from the live server's OpenAPI document
(every route, including the raw-body infer routes described in ``openapi_extra``); whatever
it sends, the server must never answer with a 5xx (503 "not ready/queue full" excepted only
where the route can legitimately shed, which it does not at this load)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error

from tests.e2e.server import RemoteServer
from tests.models import basic_repository

EXAMPLES = 12  # per operation; about 20 operations -> a few hundred requests, well under 60 s


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    root = tmp_path_factory.mktemp("fuzz")
    repo = basic_repository(root / "repository")
    env = {"SLIMSERVE_JOBS_DIR": str(root / "jobs"), "SLIMSERVE_MAX_UPLOAD_BYTES": "200000"}
    args = ("--model-control-mode", "explicit", "--load-model", "*")
    with RemoteServer(repo, *args, env=env) as server:
        yield server


def fuzz_operation(operation: schemathesis.APIOperation, base_url: str) -> int:
    """Run ``EXAMPLES`` generated cases of one operation; the number of cases sent."""
    sent = 0

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        derandomize=True,
        database=None,
    )
    def run(case: schemathesis.Case) -> None:
        nonlocal sent
        sent += 1
        case.call_and_validate(base_url=base_url, checks=[not_a_server_error], timeout=30)

    run()
    return sent


def test_no_server_errors(fuzzed_server: RemoteServer) -> None:
    # schemathesis' own pytest plugin does not run under this pytest; drive it directly
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    sent = {op.label: fuzz_operation(op, fuzzed_server.url) for op in operations}
    assert all(count > 0 for count in sent.values()), sent
    assert "POST /v2/models/{name}/infer" in sent


def test_infer_route_body_is_documented(fuzzed_server: RemoteServer) -> None:
    document = httpx.get(f"{fuzzed_server.url}/openapi.json").json()
    body = document["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]
    assert "inputs" in body["content"]["application/json"]["schema"]["required"]


def test_server_survived_the_fuzzing(fuzzed_server: RemoteServer, tmp_path: Path) -> None:
    row = [1.0] * 16
    body = {
        "inputs": [
            {"name": n, "datatype": "FP32", "shape": [1, 16], "data": row}
            for n in ("INPUT0", "INPUT1")
        ]
    }
    # the fuzzer may have unloaded add_sub: load it again (explicit mode), then infer
    assert httpx.post(f"{fuzzed_server.url}/v2/repository/models/add_sub/load").status_code == 200
    response = httpx.post(f"{fuzzed_server.url}/v2/models/add_sub/infer", json=body)
    assert response.status_code == 200, response.text
    assert "Traceback" not in fuzzed_server.log
