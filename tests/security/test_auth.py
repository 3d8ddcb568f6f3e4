"""API keys against a real server: 401 without a key, 403 for the wrong scope, keys never logged."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from tritonclient.utils import InferenceServerException

from serving.auth import ApiKeys, bearer_token
from serving.settings import Settings
from tests.e2e.helpers import infer_input
from tests.e2e.server import RemoteServer
from tests.models import basic_repository

INFER_KEY = "infer-key-7f3a9c1e0b5d"
ADMIN_KEY = "admin-key-c4e8a2f6d91b"
METRICS_KEY = "metrics-key-19be77d0a3c2"
ROW = [1.0] * 16
BODY = orjson.dumps(
    {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": ROW},
            {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": ROW},
        ]
    }
)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    root = tmp_path_factory.mktemp("auth")
    repo = basic_repository(root / "repository")
    admin_file = root / "admin.key"
    admin_file.write_text(ADMIN_KEY + "\n")  # mounted secrets often end with a newline
    env = {
        "SLIMSERVE_INFER_API_KEY": INFER_KEY,
        "SLIMSERVE_ADMIN_API_KEY_FILE": str(admin_file),
        "SLIMSERVE_METRICS_API_KEY": METRICS_KEY,
        "SLIMSERVE_JOBS_DIR": str(root / "jobs"),
        "SLIMSERVE_ACCESS_LOG": "true",
    }
    args = ("--model-control-mode", "explicit", "--load-model", "*", "--log-level", "debug")
    with RemoteServer(repo, *args, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def http(server: RemoteServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        yield client


# (method, path, body, scope): one route of each router
ROUTES = [
    ("POST", "/v2/models/add_sub/infer", BODY, "infer"),
    ("POST", "/v2/models/add_sub/versions/1/infer", BODY, "infer"),
    ("GET", "/v2/models/add_sub", None, "infer"),
    ("GET", "/v2/models/add_sub/ready", None, "infer"),
    ("GET", "/v2/models/add_sub/config", None, "infer"),
    ("GET", "/v2/models/stats", None, "infer"),
    ("POST", "/v2/repository/index", b"{}", "admin"),
    ("POST", "/v2/repository/models/add_sub/load", b"{}", "admin"),
    ("GET", "/v2/optimize/jobs", None, "admin"),
    ("POST", "/v2/optimize", b"", "admin"),
    ("GET", "/metrics", None, "metrics"),
]
KEYS = {"infer": INFER_KEY, "admin": ADMIN_KEY, "metrics": METRICS_KEY}
# which keys open which scope: admin is a superset of infer and metrics
ALLOWED = {"infer": {"infer", "admin"}, "admin": {"admin"}, "metrics": {"metrics", "admin"}}


@pytest.mark.parametrize(("method", "path", "body", "scope"), ROUTES, ids=[r[1] for r in ROUTES])
def test_every_scope_is_enforced(
    http: httpx.Client, method: str, path: str, body: bytes | None, scope: str
) -> None:
    anonymous = http.request(method, path, content=body)
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in anonymous.json()["error"]

    wrong = http.request(method, path, content=body, headers=bearer("not-a-key"))
    assert wrong.status_code == 401
    assert "not-a-key" not in wrong.text

    for holder, key in KEYS.items():
        response = http.request(method, path, content=body, headers=bearer(key))
        if holder in ALLOWED[scope]:
            # past the gate: whatever the route itself answers, it is not an auth error
            assert response.status_code not in (401, 403), (holder, response.text)
        else:
            assert response.status_code == 403, (holder, response.text)
            assert f"{scope} API" in response.json()["error"]


def test_allowed_requests_really_run(http: httpx.Client) -> None:
    infer = http.post("/v2/models/add_sub/infer", content=BODY, headers=bearer(INFER_KEY))
    assert infer.status_code == 200
    outputs = {o["name"]: o["data"] for o in infer.json()["outputs"]}
    assert outputs["OUTPUT0"] == [2.0] * 16
    index = http.post("/v2/repository/index", content=b"{}", headers=bearer(ADMIN_KEY))
    assert index.status_code == 200
    assert {m["name"] for m in index.json()} == {"add_sub", "all_types"}
    metrics = http.get("/metrics", headers=bearer(METRICS_KEY))
    assert metrics.status_code == 200
    assert "nv_inference_request_success" in metrics.text


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/v2"])
def test_health_stays_open_for_probes(http: httpx.Client, path: str) -> None:
    assert http.get(path).status_code == 200


@pytest.mark.parametrize(
    "header", ["Basic aW5mZXI6a2V5", "Bearer", "Bearer x", INFER_KEY, f"Token {INFER_KEY}"]
)
def test_malformed_authorization_is_401(http: httpx.Client, header: str) -> None:
    response = http.post(
        "/v2/models/add_sub/infer", content=BODY, headers={"Authorization": header}
    )
    assert response.status_code == 401


def test_tritonclient_sends_the_key(server: RemoteServer) -> None:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    inputs = [infer_input("INPUT0", x), infer_input("INPUT1", x)]
    client = server.client()
    result = client.infer("add_sub", inputs, headers=bearer(INFER_KEY))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + x)
    assert client.is_server_live()  # health needs no key
    with pytest.raises(InferenceServerException, match="API key"):
        client.infer("add_sub", [infer_input("INPUT0", x), infer_input("INPUT1", x)])
    with pytest.raises(InferenceServerException, match="admin API"):
        client.load_model("add_sub", headers=bearer(INFER_KEY))
    client.load_model("add_sub", headers=bearer(ADMIN_KEY))
    client.close()


def test_keys_are_never_logged(http: httpx.Client, server: RemoteServer) -> None:
    for key in (*KEYS.values(), "not-a-key"):
        http.post("/v2/models/add_sub/infer", content=BODY, headers=bearer(key))
        http.post("/v2/repository/index", content=b"{}", headers=bearer(key))
    log = server.log
    assert "POST /v2/repository/index" in log or re.search(r"\b40[13]\b", log)
    for key in (*KEYS.values(), "not-a-key"):
        assert key not in log


def test_metrics_on_a_separate_port(tmp_path: Path, start_server) -> None:
    repo = basic_repository(tmp_path / "repository")
    env = {"SLIMSERVE_METRICS_PORT": "0", "SLIMSERVE_METRICS_API_KEY": METRICS_KEY}
    server = start_server(repo, env=env)
    match = re.search(r"metrics on http://([\d.]+):(\d+)/metrics", server.log)
    assert match, server.log
    metrics_url = f"http://127.0.0.1:{match.group(2)}/metrics"
    assert httpx.get(f"{server.url}/metrics").status_code == 404
    denied = httpx.get(metrics_url)
    assert denied.status_code == 401
    assert denied.headers["WWW-Authenticate"].startswith("Bearer")
    response = httpx.get(metrics_url, headers=bearer(METRICS_KEY))
    assert response.status_code == 200
    assert "nv_inference_request_success" in response.text
    # inference is open (no infer key) and still served on the main port
    assert httpx.post(f"{server.url}/v2/models/add_sub/infer", content=BODY).status_code == 200


# -- unit: key sources and comparison ------------------------------------------------------
def test_key_file_wins_and_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("  from-file\n")
    keys = ApiKeys.from_settings(Settings(admin_api_key="plain", admin_api_key_file=path))
    assert keys.admin == b"from-file"
    assert keys.infer is None
    assert "from-file" not in repr(keys)


@pytest.mark.parametrize("content", [None, ""])
def test_unusable_key_file_is_a_clear_error(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "k"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="SLIMSERVE_INFER_API_KEY_FILE"):
        ApiKeys.from_settings(Settings(infer_api_key_file=path))


def test_settings_repr_hides_keys() -> None:
    settings = Settings(infer_api_key="s3cret-value")
    assert "s3cret-value" not in repr(settings)
    assert "s3cret-value" not in str(settings.model_dump())


def test_no_keys_means_open() -> None:
    keys = ApiKeys()
    assert not keys.enabled
    keys.check("admin", None)  # no error


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == b"abc"
    assert bearer_token("bearer   abc ") == b"abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None
