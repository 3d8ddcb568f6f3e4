"""Safe defaults: bound to 127.0.0.1, CORS off, no keys needed until some are configured."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from serving.app import build_app
from serving.settings import Settings
from tests.models import basic_repository


def test_defaults_bind_locally_without_cors(monkeypatch) -> None:
    for name in ("SLIMSERVE_HOST", "SLIMSERVE_CORS_ORIGINS"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.cors_origins == []
    assert settings.metrics_port is None


def test_no_cors_headers_unless_configured(tmp_path: Path) -> None:
    repo = basic_repository(tmp_path / "repository")
    origin = {"Origin": "https://evil.example"}
    with TestClient(build_app(Settings(repository=repo))) as client:
        response = client.get("/v2/health/live", headers=origin)
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers
        preflight = client.options(
            "/v2/models/add_sub/infer",
            headers={**origin, "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers
    allowed = Settings(repository=repo, cors_origins=["https://app.example"])
    with TestClient(build_app(allowed)) as client:
        response = client.get("/v2/health/live", headers={"Origin": "https://app.example"})
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = client.get("/v2/health/live", headers=origin)
        assert "access-control-allow-origin" not in other.headers


def _wait_until_ready(client: TestClient, timeout_s: float = 60.0) -> None:
    """Models load in the background after start-up: wait for the server's readiness."""
    import time

    deadline = time.monotonic() + timeout_s
    while client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.05)


def test_keys_guard_the_in_process_routes_too(tmp_path: Path) -> None:
    """The FastAPI routes (fast_infer=False) and the fast path enforce the same keys."""
    repo = basic_repository(tmp_path / "repository")
    settings = Settings(repository=repo, infer_api_key="k-infer", admin_api_key="k-admin")
    body = {
        "inputs": [
            {"name": n, "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}
            for n in ("INPUT0", "INPUT1")
        ]
    }
    for fast in (True, False):
        with TestClient(build_app(settings, fast_infer=fast)) as client:
            _wait_until_ready(client)
            url = "/v2/models/add_sub/infer"
            assert client.post(url, json=body).status_code == 401
            ok = client.post(url, json=body, headers={"Authorization": "Bearer k-infer"})
            assert ok.status_code == 200
            admin = client.post(url, json=body, headers={"Authorization": "Bearer k-admin"})
            assert admin.status_code == 200
            index = client.post("/v2/repository/index", headers={"Authorization": "Bearer k-infer"})
            assert index.status_code == 403
