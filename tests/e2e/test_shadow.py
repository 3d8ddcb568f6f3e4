"""Shadow fidelity through a real server: tritonclient traffic, stats, metrics, fallback."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.e2e.helpers import infer_input, run_direct
from tests.models import mlp_model, write_model
from tests.serving.test_shadow import FEATURES, int8, perturbed, shadow_config

DASHBOARD = Path(__file__).parents[2] / "helm" / "slimserve" / "dashboards" / "slimserve.json"
METRIC = re.compile(r"\b(slimserve_shadow_[a-z0-9_]+)\b")


def _compressed(root: Path, name: str, model: bytes, **params: str) -> Path:
    folder = write_model(
        root, name, mlp_model(features=FEATURES), model_config=shadow_config(**params)
    )
    (folder / "2").mkdir()
    (folder / "2" / "model.onnx").write_bytes(model)
    report = {"source_version": 1, "fidelity_bound": {"min_cosine": 0.99}}
    (folder / "2" / "report.json").write_text(json.dumps(report))
    return folder


def _shadow_stats(url: str, name: str, samples: int) -> dict[str, Any]:
    """The version's shadow summary once ``samples`` samples were compared."""
    deadline = time.monotonic() + 30
    while True:
        stats = httpx.get(f"{url}/v2/models/{name}/versions/2/stats").json()
        summary = stats["model_stats"][0]["shadow"]
        if summary["samples"] >= samples or time.monotonic() > deadline:
            return summary
        time.sleep(0.05)


def _metric(text: str, name: str, model: str) -> float:
    prefix = f'{name}{{model="{model}",source_version="1",version="2"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"{prefix!r} not in /metrics")


@pytest.fixture
def server(tmp_path: Path, start_server):
    repo = tmp_path / "repo"
    _compressed(repo, "int8", int8(mlp_model(features=FEATURES), tmp_path), shadow_sample_rate="1")
    _compressed(
        repo,
        "broken",
        perturbed(mlp_model(features=FEATURES), 1.0),
        shadow_sample_rate="1",
        shadow_min_samples="5",
        shadow_fallback="true",
    )
    return start_server(repo)


def test_int8_version_is_watched_without_alerts(server) -> None:
    client = server.client()
    rng = np.random.default_rng(0)
    for _ in range(10):
        x = rng.standard_normal((2, FEATURES)).astype(np.float32)
        result = client.infer("int8", [infer_input("x", x)])
        assert result.get_response()["model_version"] == "2"
    summary = _shadow_stats(server.url, "int8", 10)
    assert summary["samples"] == 10
    assert 0.99 < summary["rolling_cosine"] < 1.0
    assert summary["alerting"] is False
    assert summary["alerts"] == 0
    assert summary["source_version"] == "1"
    text = httpx.get(f"{server.url}/metrics").text
    assert _metric(text, "slimserve_shadow_samples_total", "int8") == 10
    assert _metric(text, "slimserve_shadow_cosine_count", "int8") == 10
    assert _metric(text, "slimserve_shadow_alerts_total", "int8") == 0
    assert _metric(text, "slimserve_shadow_dropped_total", "int8") == 0
    size = (server.repository / "int8" / "1" / "model.onnx").stat().st_size
    assert _metric(text, "slimserve_shadow_source_model_bytes", "int8") == size
    # every metric the Grafana shadow panels query is exported, with the shadow labels
    panels = json.loads(DASHBOARD.read_text())["panels"]
    used = {m for p in panels for t in p["targets"] for m in METRIC.findall(t["expr"])}
    used = {m for m in used if m.startswith("slimserve_shadow_")}
    assert len(used) >= 8
    for name in used:
        assert re.search(rf'^{name}{{[^}}]*source_version="1"', text, re.M), name


def test_broken_version_alerts_and_falls_back(server) -> None:
    client = server.client()
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.standard_normal((2, FEATURES)).astype(np.float32)
        assert client.infer("broken", [infer_input("x", x)]).get_response()["model_version"] == "2"
    summary = _shadow_stats(server.url, "broken", 5)
    assert summary["alerting"] is True
    assert summary["fallback_active"] is True
    assert summary["rolling_cosine"] < 0.99
    # unversioned traffic is now answered by the source version, with its outputs
    x = rng.standard_normal((3, FEATURES)).astype(np.float32)
    result = client.infer("broken", [infer_input("x", x)])
    assert result.get_response()["model_version"] == "1"
    expected = run_direct(server.repository / "broken" / "1" / "model.onnx", {"x": x})["y"]
    np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-5, atol=1e-6)
    pinned = client.infer("broken", [infer_input("x", x)], model_version="2")
    assert pinned.get_response()["model_version"] == "2"
    text = httpx.get(f"{server.url}/metrics").text
    assert _metric(text, "slimserve_shadow_alerts_total", "broken") == 1
    assert _metric(text, "slimserve_shadow_fallback_active", "broken") == 1
