"""Upload -> optimization job (the real pipeline, in a worker process) -> new version served."""

from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from optimizers.onnxutil import make_session
from serving.model_config import read_config
from tests.e2e.helpers import infer_input, run_direct
from tests.e2e.server import RemoteServer
from tests.models import basic_repository, mlp_model

TERMINAL = ("succeeded", "failed", "cancelled")


def tree_digest(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def upload(
    server: RemoteServer, model: tuple[str, bytes], request: dict[str, Any], **files: Any
) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v2/optimize",
        files={"model": model, **files},
        data={"request": json.dumps(request)},
        timeout=60,
    )


def wait_job(server: RemoteServer, url: str, timeout_s: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}{url}").json()
        if job["state"] in TERMINAL:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job did not finish in {timeout_s}s: {job}")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_uploaded_model_is_optimized_and_served(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> None:
    repo = basic_repository(tmp_path / "repository")
    source = tmp_path / "mlp.onnx"
    source.write_bytes(mlp_model(width=64, depth=3, features=16))
    server = start_server(repo, env={"SLIMSERVE_JOBS_DIR": str(tmp_path / "jobs")})
    rng = np.random.default_rng(1)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, x=rng.standard_normal((32, 16)).astype(np.float32))

    response = upload(
        server,
        ("mlp.onnx", source.read_bytes()),
        {"name": "mlp", "min_cosine": 0.99, "batch_size": 8, "time_budget_s": 180},
        calibration=("calib.npz", calibration.read_bytes()),
    )
    assert response.status_code == 202, response.text
    created = response.json()
    assert response.headers["location"] == created["url"]
    job = wait_job(server, created["url"])
    assert job["state"] == "succeeded", job["error"]
    assert job["source_version"] == 1
    assert job["published_version"] == 2
    assert job["report"]["source_version"] == 1
    assert job["fraction"] == 1.0
    assert job["passes_total"]
    assert job["passes_done"] == job["passes_total"]
    assert job["log_tail"], "the worker's log is visible"

    report = json.loads((repo / "mlp" / "2" / "report.json").read_text())
    assert report["source_version"] == 1
    assert (repo / "mlp" / "1" / "model.onnx").is_file()
    assert onnx.load(str(repo / "mlp" / "2" / "model.onnx")).graph.node

    client = server.client()
    assert client.is_model_ready("mlp")
    assert client.get_model_metadata("mlp")["versions"] == ["2"]
    x = rng.standard_normal((8, 16)).astype(np.float32)
    served = client.infer("mlp", [infer_input("x", x)])
    assert served.get_response()["model_version"] == "2"
    expected = run_direct(source, {"x": x})["y"]
    got = served.as_numpy("y")
    assert got.shape == expected.shape
    # the server answers with the published engine ...
    published = run_direct(repo / "mlp" / "2" / "model.onnx", {"x": x})["y"]
    np.testing.assert_allclose(got, published, rtol=1e-5, atol=1e-5)
    # ... which holds the job's bound: min_cosine bounds the mean over examples (an INT8
    # winner can put single rows of this tiny MLP near 0.98, so no per-row 0.99 here)
    assert cosine(got, expected).mean() >= 0.99
    assert cosine(got, expected).min() >= 0.9
    # the models already served were not disturbed
    a = np.ones((1, 16), np.float32)
    result = client.infer("add_sub", [infer_input("INPUT0", a), infer_input("INPUT1", a)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)


def broken_onnx() -> bytes:
    """Parses as ONNX, but its one node is an operator no runtime has."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    node = helper.make_node("NoSuchOperator", ["x"], ["y"], domain="com.example.missing")
    graph = helper.make_graph([node], "broken", [x], [y])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example.missing", 1)],
    )
    return model.SerializeToString()


def test_failing_job_leaves_the_repository_unchanged(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> None:
    repo = basic_repository(tmp_path / "repository")
    server = start_server(repo, env={"SLIMSERVE_JOBS_DIR": str(tmp_path / "jobs")})
    before = tree_digest(repo)
    for name in ("add_sub", "brand_new"):
        response = upload(server, ("model.onnx", broken_onnx()), {"name": name})
        assert response.status_code == 202, response.text
        job = wait_job(server, response.json()["url"])
        assert job["state"] == "failed"
        assert job["error"]
        assert job["published_version"] is None
        assert (tmp_path / "jobs" / job["id"] / "upload" / "model.onnx").is_file()
    assert tree_digest(repo) == before
    client = server.client()
    assert client.is_server_live()
    assert client.is_model_ready("add_sub")
    assert not client.is_model_ready("brand_new")


class TinyMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def onnx_with_data_zip(tmp_path: Path) -> tuple[bytes, Path]:
    """The MLP as ``model.onnx`` + ``model.onnx.data`` in a zip; and the plain file."""
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(mlp_model(width=64, depth=3, features=16, seed=3))
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save_model(
        onnx.load(str(plain)),
        str(folder / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ("model.onnx", "model.onnx.data"):
            archive.write(folder / name, f"mlp/{name}")
    return buffer.getvalue(), plain


@pytest.mark.slow
def test_archive_and_torch_export_uploads(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> None:
    repo = basic_repository(tmp_path / "repository")
    server = start_server(repo, env={"SLIMSERVE_JOBS_DIR": str(tmp_path / "jobs")})
    zipped, plain = onnx_with_data_zip(tmp_path)
    net = TinyMLP().eval()
    pt2 = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(4, 16),)), str(pt2))
    uploads = {
        "from_zip": upload(server, ("mlp.zip", zipped), {"name": "from_zip", "time_budget_s": 180}),
        "from_pt2": upload(
            server, ("tiny.pt2", pt2.read_bytes()), {"name": "from_pt2", "time_budget_s": 180}
        ),
    }
    rng = np.random.default_rng(2)
    client = server.client()
    for name, response in uploads.items():
        assert response.status_code == 202, response.text
        job = wait_job(server, response.json()["url"])
        assert job["state"] == "succeeded", (name, job["error"], job["log_tail"])
        assert job["source"]["kind"] == ("onnx" if name == "from_zip" else "pt2")
        metadata = client.get_model_metadata(name)
        assert metadata["versions"] == ["2"]
        input_name = metadata["inputs"][0]["name"]
        output_name = metadata["outputs"][0]["name"]
        x = rng.standard_normal((4, 16)).astype(np.float32)
        got = client.infer(name, [infer_input(input_name, x)]).as_numpy(output_name)
        if name == "from_zip":
            expected = run_direct(plain, {"x": x})["y"]
        else:
            with torch.no_grad():
                expected = net(torch.from_numpy(x)).numpy()
        # the server answers with the published engine, which held the job's bound on the
        # job's own evaluation inputs; on 4 fresh random rows an INT8 winner of this tiny MLP
        # can put one row near 0.94 (CI simulation), so fresh rows get a sanity bound only
        published = run_direct(repo / name / "2" / "model.onnx", {input_name: x})[output_name]
        np.testing.assert_allclose(got, published, rtol=1e-5, atol=1e-5)
        report = json.loads((repo / name / "2" / "report.json").read_text())
        assert report["winner"]["fidelity"]["cosine"] >= 0.99, name
        assert cosine(got, expected).min() >= 0.9, name


def tiny_bert_archive(tmp_path: Path) -> tuple[bytes, Any]:
    """A 2-layer BERT as a Hugging Face folder (config.json + model.safetensors), tar.gz."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = BertModel(config).eval()
    folder = tmp_path / "tiny-bert"
    model.save_pretrained(str(folder), safe_serialization=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname="tiny-bert")
    return buffer.getvalue(), model


@pytest.mark.slow
def test_hugging_face_checkpoint_upload(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> None:
    repo = basic_repository(tmp_path / "repository")
    server = start_server(repo, env={"SLIMSERVE_JOBS_DIR": str(tmp_path / "jobs")})
    archive, model = tiny_bert_archive(tmp_path)
    response = upload(
        server,
        ("tiny-bert.tar.gz", archive),
        {"name": "tiny_bert", "batch_size": 2, "seq_len": 16, "time_budget_s": 300},
    )
    assert response.status_code == 202, response.text
    job = wait_job(server, response.json()["url"], timeout_s=400)
    assert job["state"] == "succeeded", (job["error"], job["log_tail"])
    assert job["source"]["kind"] == "hf"
    client = server.client()
    metadata = client.get_model_metadata("tiny_bert")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, size=(2, 16), dtype=np.int64)
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }
    inputs, engine_feeds = [], {}
    for spec in metadata["inputs"]:
        array = feeds[spec["name"]].astype(np.int32 if spec["datatype"] == "INT32" else np.int64)
        inputs.append(infer_input(spec["name"], array))
        engine_feeds[spec["name"]] = array
    output = metadata["outputs"][0]["name"]
    got = client.infer("tiny_bert", inputs).as_numpy(output)
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    assert got.shape == tuple(expected.shape)
    # the published engine answers, within the bound the job measured (on pooled embeddings
    # of its own evaluation inputs); single tokens of fresh input get a sanity bound
    version = repo / "tiny_bert" / "2"
    accelerators = read_config(repo / "tiny_bert").optimization.execution_accelerators
    on_openvino = [a.name for a in accelerators.cpu_execution_accelerator] == ["openvino"]
    session = make_session(version / "model.onnx", accelerator="openvino" if on_openvino else None)
    published = session.run([output], engine_feeds)[0]
    np.testing.assert_allclose(got, published, rtol=1e-3, atol=1e-3)
    report = json.loads((version / "report.json").read_text())
    assert report["winner"]["fidelity"]["cosine"] >= 0.99
    per_token = cosine(got.reshape(-1, 32), expected.numpy().reshape(-1, 32))
    assert per_token.mean() >= 0.99
    assert per_token.min() >= 0.9
