"""Explicit model control: load/unload on request, also with Triton's config and file overrides."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.e2e.helpers import infer_input
from tests.models import add_sub_model, basic_repository, scaled_model, write_model


def _index(client) -> dict[tuple[str, str], tuple[str, str]]:
    return {
        (m["name"], m.get("version", "")): (m.get("state", ""), m.get("reason", ""))
        for m in client.get_model_repository_index()
    }


def test_load_and_unload(tmp_path: Path, start_server) -> None:
    repo = basic_repository(tmp_path / "repo")
    server = start_server(repo, "--model-control-mode", "explicit", "--load-model", "add_sub")
    client = server.client()
    try:
        assert client.is_model_ready("add_sub")
        assert not client.is_model_ready("all_types")
        index = _index(client)
        assert index[("add_sub", "1")][0] == "READY"
        assert index[("all_types", "")][0] == "UNAVAILABLE"
        with pytest.raises(InferenceServerException, match="not loaded"):
            client.infer("all_types", [infer_input("IN_FP32", np.zeros((1, 3), np.float32))])

        client.load_model("all_types")
        assert client.is_model_ready("all_types")
        client.unload_model("add_sub")
        assert not client.is_model_ready("add_sub")
        assert _index(client)[("add_sub", "")] == ("UNAVAILABLE", "unloaded")
        a = np.ones((1, 16), np.float32)
        with pytest.raises(InferenceServerException, match="is not ready: unloaded"):
            client.infer("add_sub", [infer_input("INPUT0", a), infer_input("INPUT1", a)])
        with pytest.raises(InferenceServerException, match="not in the repository"):
            client.load_model("does_not_exist")
        # the ready-only index
        ready = httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}).json()
        assert [(m["name"], m["state"]) for m in ready] == [("all_types", "READY")]
    finally:
        client.close()


def test_load_with_config_and_files(tmp_path: Path, start_server) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    server = start_server(repo, "--model-control-mode", "explicit")
    client = server.client()
    try:
        config = json.dumps(
            {"platform": "onnxruntime_onnx", "max_batch_size": 4, "dynamic_batching": {}}
        )
        client.load_model("scaled", config=config, files={"file:1/model.onnx": scaled_model(3.0)})
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        result = client.infer("scaled", [infer_input("x", x)])
        np.testing.assert_array_equal(result.as_numpy("y"), x * 3.0)
        assert client.get_model_config("scaled")["max_batch_size"] == 4
        assert (repo / "scaled" / "1" / "model.onnx").read_bytes() == scaled_model(3.0)
        assert "max_batch_size: 4" in (repo / "scaled" / "config.pbtxt").read_text()

        # a second version hot-swaps in (the default policy serves the newest)
        client.load_model("scaled", files={"file:2/model.onnx": scaled_model(5.0)})
        result = client.infer("scaled", [infer_input("x", x)])
        np.testing.assert_array_equal(result.as_numpy("y"), x * 5.0)
        assert result.get_response()["model_version"] == "2"
        assert not client.is_model_ready("scaled", "1")

        # versions are immutable
        with pytest.raises(InferenceServerException, match="already has version"):
            client.load_model("scaled", files={"file:2/model.onnx": scaled_model(7.0)})
        # broken uploads are refused with the reason, and the served version stays
        with pytest.raises(InferenceServerException, match="failed to load 'scaled'"):
            client.load_model("scaled", files={"file:3/model.onnx": b"not an onnx model"})
        result = client.infer("scaled", [infer_input("x", x)])
        np.testing.assert_array_equal(result.as_numpy("y"), x * 5.0)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("name", "body", "status", "fragment"),
    [
        ("m", {"parameters": {"config": "{not json"}}, 400, "not valid JSON"),
        ("m", {"parameters": {"config": '{"max_batch_size": "x"}'}}, 400, "ModelConfig"),
        ("m", {"parameters": {"file:1/model.onnx": "***"}}, 400, "base64"),
        ("m", {"parameters": {"file:model.onnx": "AAAA"}}, 400, "file:<version>/<path>"),
        ("m", {"parameters": {"file:1/../../x": "AAAA"}}, 400, "escapes"),
        ("m", {"parameters": {"colour": "red"}}, 400, "unknown load parameter"),
        ("m", {"parameters": {"config": '{"name": "other"}'}}, 400, "names model 'other'"),
        ("a..b", {}, 400, "invalid model name"),
        ("%2E%2E", {}, 400, "invalid model name"),
        ("missing", {}, 404, "not in the repository"),
    ],
)
def test_load_mistakes(
    tmp_path: Path, explicit_server, name: str, body: dict, status: int, fragment: str
) -> None:
    response = httpx.post(f"{explicit_server.url}/v2/repository/models/{name}/load", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    root = Path(explicit_server.repository)
    assert sorted(p.name for p in root.iterdir()) == ["add_sub"]
    assert not (root.parent / "x").exists()


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory: pytest.TempPathFactory):
    from tests.e2e.server import RemoteServer

    repo = tmp_path_factory.mktemp("explicit") / "repo"
    write_model(repo, "add_sub", add_sub_model())
    with RemoteServer(repo, "--model-control-mode", "explicit") as server:
        yield server


def test_files_for_unknown_model_create_it(explicit_server) -> None:
    files = {"file:1/model.onnx": base64.b64encode(add_sub_model(4)).decode()}
    url = f"{explicit_server.url}/v2/repository/models/fresh/load"
    response = httpx.post(url, json={"parameters": files})
    assert response.status_code == 200, response.text
    infer = httpx.post(
        f"{explicit_server.url}/v2/models/fresh/infer",
        json={
            "inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
                {"name": "INPUT1", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]},
            ]
        },
    )
    assert infer.status_code == 200, infer.text
    assert infer.json()["outputs"][0]["data"] == [2, 3, 4, 5]
    assert httpx.post(f"{explicit_server.url}/v2/repository/models/fresh/unload").status_code == 200
    import shutil

    shutil.rmtree(Path(explicit_server.repository) / "fresh")
