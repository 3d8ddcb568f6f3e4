"""On a CUDA host: the server runs models on the GPU, and a ``cuda`` job publishes a GPU version.

Both tests need ``onnxruntime-gpu`` (the ``gpu`` extra) and an NVIDIA GPU; elsewhere they skip
with the reason. A model whose config asks for ``KIND_GPU`` only becomes ready when its session
really runs on ``CUDAExecutionProvider`` (``serving.backends.onnxruntime``), so readiness below
is the proof that the answers came from the GPU.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from serving.model_config import read_config, write_config
from tests.e2e.helpers import infer_input, run_direct
from tests.e2e.server import RemoteServer
from tests.e2e.test_upload_pipeline import cosine, upload, wait_job
from tests.models import basic_repository, mlp_model

PROJECT = Path(__file__).resolve().parents[2]
NO_CUDA = (
    None
    if "CUDAExecutionProvider" in ort.get_available_providers()
    else "onnxruntime has no CUDAExecutionProvider here "
    f"(providers: {ort.get_available_providers()}); install the 'gpu' extra on a CUDA host"
)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NO_CUDA is not None, reason=NO_CUDA or "")]


def metric_samples(text: str, name: str) -> list[tuple[str, float]]:
    """``(labels, value)`` of every sample of ``name`` in a Prometheus text page."""
    samples = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            samples.append((labels[len(name) :], float(value)))
    return samples


def test_gpu_instance_group_serves_on_cuda(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> None:
    repo = tmp_path / "repository"
    shutil.copytree(PROJECT / "model_repository" / "digits_cnn", repo / "digits_cnn")
    config = read_config(repo / "digits_cnn")
    del config.instance_group[:]
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    write_config(repo / "digits_cnn", config)
    server = start_server(repo)

    client = server.client(concurrency=8)
    assert client.is_model_ready("digits_cnn"), "a KIND_GPU model is ready only on CUDA"
    served_config = client.get_model_config("digits_cnn")
    assert served_config["instance_group"][0]["kind"] == "KIND_GPU"
    data = np.load(PROJECT / "bench" / "data" / "digits_test.npz")
    model_file = next((repo / "digits_cnn").glob("*/model.onnx"))
    for rows in (1, 7, 64):
        x = data["x"][:rows]
        got = client.infer("digits_cnn", [infer_input("input", x)]).as_numpy("logits")
        expected = run_direct(model_file, {"input": x})["logits"]
        # cuDNN may use TF32 on Ampere and newer: ~1e-3 of the logits' scale, same classes
        assert np.abs(got - expected).max() <= 2e-3 * np.abs(expected).max()
        assert (got.argmax(1) == expected.argmax(1)).all()

    # concurrent callers are batched onto the GPU instance and each gets its own rows back
    x = data["x"][:48]
    pending = [
        client.async_infer("digits_cnn", [infer_input("input", x[i : i + 1])]) for i in range(48)
    ]
    got = np.concatenate([p.get_result().as_numpy("logits") for p in pending])
    expected = run_direct(model_file, {"input": x})["logits"]
    assert np.abs(got - expected).max() <= 2e-3 * np.abs(expected).max()

    page = httpx.get(f"{server.url}/metrics").text
    used = metric_samples(page, "nv_gpu_memory_used_bytes")
    assert used, "NVML metrics of the real GPU"
    assert all(value > 0 for _, value in used)
    counts = metric_samples(page, "nv_inference_count")
    served = sum(value for labels, value in counts if 'model="digits_cnn"' in labels)
    assert served == 1 + 7 + 64 + 48


def test_cuda_job_publishes_a_version_served_on_the_gpu(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> None:
    repo = basic_repository(tmp_path / "repository")
    source = tmp_path / "mlp.onnx"
    source.write_bytes(mlp_model(width=512, depth=4, features=64))
    server = start_server(repo, env={"SLIMSERVE_JOBS_DIR": str(tmp_path / "jobs")})
    rng = np.random.default_rng(3)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, x=rng.standard_normal((64, 64)).astype(np.float32))

    response = upload(
        server,
        ("mlp.onnx", source.read_bytes()),
        {"name": "mlp", "target": "cuda", "min_cosine": 0.99, "batch_size": 32},
        calibration=("calib.npz", calibration.read_bytes()),
    )
    assert response.status_code == 202, response.text
    job = wait_job(server, response.json()["url"])
    assert job["state"] == "succeeded", job["error"]

    report = json.loads((repo / "mlp" / "2" / "report.json").read_text())
    assert report["target"] == "cuda"
    assert report["providers"][0] == "CUDAExecutionProvider", "the baseline was timed on CUDA"
    assert report["engine"]["device"] == "gpu"
    measured = [c for c in report["candidates"] if c.get("latency")]
    assert measured
    assert all(c["latency"]["providers"][0] == "CUDAExecutionProvider" for c in measured)
    assert any("fp16" in c["passes"] for c in measured), "FP16 was timed for CUDA"
    config = read_config(repo / "mlp")
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert config.max_batch_size == 32

    client = server.client()
    assert client.is_model_ready("mlp"), "the published version loads on the GPU"
    x = rng.standard_normal((32, 64)).astype(np.float32)  # the job's batch_size is servable
    served = client.infer("mlp", [infer_input("x", x)])
    assert served.get_response()["model_version"] == "2"
    expected = run_direct(source, {"x": x})["y"]
    got = served.as_numpy("y")
    assert got.dtype == np.float32, "callers still send and get FP32"
    assert cosine(got, expected).mean() >= 0.99
    # the CPU model served beside it is untouched
    a = np.ones((1, 16), np.float32)
    result = client.infer("add_sub", [infer_input("INPUT0", a), infer_input("INPUT1", a)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)


def test_packing_job_serves_packed_fp16_bert_on_the_gpu(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> None:
    """Upload -> cuda job requiring ``ort_packing_mode`` -> the packed FP16 graph served on the
    GPU answers padded batches like the original on real tokens."""
    from optimizers.calibration import pydoc_sentences
    from optimizers.fidelity import compare
    from optimizers.onnxutil import make_session
    from tests.e2e.helpers import folder_tar_gz
    from tests.e2e.test_transformer_passes import _feeds
    from tests.optimizers.tiny import tiny_bert_checkpoint

    folder = tiny_bert_checkpoint(tmp_path / "tiny-bert", layers=2, seed=3)
    sentences = pydoc_sentences()[:400:4]
    repo = tmp_path / "repository"
    repo.mkdir()
    server = start_server(repo, env={"SLIMSERVE_JOBS_DIR": str(tmp_path / "jobs")})
    chain = ["ort_transformer_optimize", "fp16", "ort_packing_mode"]
    request = {"name": "bert", "target": "cuda", "batch_size": 4, "seq_len": 32,
               "min_cosine": 0.99, "allow": chain, "require": ["ort_packing_mode"]}  # fmt: skip
    response = upload(
        server,
        ("tiny-bert.tar.gz", folder_tar_gz(folder)),
        request,
        calibration=("texts.txt", "\n".join(sentences[:80]).encode()),
    )
    assert response.status_code == 202, response.text
    job = wait_job(server, response.json()["url"], timeout_s=300)
    assert job["state"] == "succeeded", (job["error"], job["log_tail"])
    version, source = job["published_version"], job["source_version"]
    report = json.loads((repo / "bert" / str(version) / "report.json").read_text())
    assert report["winner"]["passes"] == chain
    assert report["require"]["met"] is True
    assert report["engine"]["device"] == "gpu"
    assert [g.kind for g in read_config(repo / "bert").instance_group] == [
        mc.ModelInstanceGroup.KIND_GPU
    ]

    client = server.client()
    assert client.is_model_ready("bert", str(version))
    metadata = client.get_model_metadata("bert", str(version))
    names = [spec["name"] for spec in metadata["inputs"]]
    output = metadata["outputs"][0]["name"]
    packed = make_session(repo / "bert" / str(version) / "model.onnx", "cuda")
    texts = sentences[80:]
    batches = [_feeds(folder, texts[i : i + 4], names) for i in range(0, 16, 4)]
    served, original = [], []
    for feeds in batches:
        assert len(set(feeds["attention_mask"].sum(1).tolist())) > 1  # padded batches
        result = client.infer("bert", [infer_input(n, feeds[n]) for n in names])
        got = result.as_numpy(output)
        real = feeds["attention_mask"].astype(bool)
        direct = packed.run([output], feeds)[0]
        np.testing.assert_allclose(got[real], direct[real], rtol=1e-3, atol=1e-3)
        served.append([got])
        original.append([run_direct(repo / "bert" / str(source) / "model.onnx", feeds)[output]])
    fidelity = compare(original, served, batches, family="transformer")
    assert fidelity["cosine_min"] >= 0.99, fidelity
