"""``target="tensorrt"`` through the pipeline: plans published as ``model.plan`` +
``model.plan.json`` (``tensorrt_plan``); on a machine without TensorRT/GPU the build is not
applicable and the best ONNX candidate is published, the report saying why."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from optimizers.api import OptimizationRequest, run_optimization
from optimizers.chains import build_chains
from optimizers.passes.base import Artifact
from optimizers.pipeline import save_engine
from serving.backends.tensorrt import probe_environment
from serving.errors import ModelNotReady
from serving.jobs.publish import publish_result
from serving.repository import ModelRepository


def _has_tensorrt() -> bool:
    try:
        probe_environment(0)
    except ModelNotReady:
        return False
    return True


def test_tensorrt_chains_end_with_a_build() -> None:
    for family in ("generic", "cnn", "transformer"):
        chains, _ = build_chains(family, "tensorrt")
        built = [[n for n, _ in c] for c in chains if c[-1][0] == "tensorrt_build"]
        assert ["tensorrt_build"] in built
        assert ["fp16", "tensorrt_build"] in built
        assert ["quantize_static", "tensorrt_build"] in built
        assert not any("ort_transformer_optimize" in c for c in built)


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT and a GPU are present: a plan is built")
def test_tensorrt_target_on_cpu_falls_back_to_onnx(tiny_mlp_onnx: Path, tmp_path: Path) -> None:
    request = OptimizationRequest(
        name="mlp", target="tensorrt", batch_size=2, allow=("fp16", "tensorrt_build")
    )
    result = run_optimization(tiny_mlp_onnx, request, tmp_path / "job")
    assert result.platform == "onnxruntime_onnx"
    assert result.engine_file.name == "model.onnx"
    assert result.engine_file.is_file()
    report = result.report
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert report["engine"] == {
        "platform": "onnxruntime_onnx",
        "file": "model.onnx",
        **({"device": "gpu"} if cuda else {}),  # a GPU host without TensorRT times on CUDA
    }
    trt = report["tensorrt"]
    assert trt["plan_published"] is False
    labels = {a["label"] for a in trt["build_attempts"]}
    assert labels == {"tensorrt_build", "fp16 -> tensorrt_build"}
    for attempt in trt["build_attempts"]:
        assert attempt["status"] == "dropped"
        if attempt["label"] == "tensorrt_build":
            assert "not applicable: tensorrt_build needs TensorRT and a GPU" in attempt["reason"]
    assert "no TensorRT plan was built" in trt["note"]
    assert f"published the best ONNX candidate ({report['winner']['id']})" in trt["note"]
    on_disk = json.loads(result.files["report.json"].read_text(encoding="utf-8"))
    assert on_disk["tensorrt"]["plan_published"] is False


def _fake_plan(folder: Path, onnx: Path) -> Artifact:
    """An artifact as the tensorrt_build pass leaves it (plan bytes are opaque here)."""
    folder.mkdir(parents=True)
    plan = folder / "engine.plan"
    plan.write_bytes(b"not-a-real-plan\x00\x01")
    (folder / "engine.plan.json").write_text(json.dumps({"tensorrt_version": "10.0"}))
    return Artifact("onnx", "generic", onnx_path=onnx, meta={"tensorrt_plan": str(plan)})


def test_save_engine_publishes_plan_and_sidecar(tiny_mlp_onnx: Path, tmp_path: Path) -> None:
    artifact = _fake_plan(tmp_path / "build", tiny_mlp_onnx)
    engine, platform, files = save_engine(artifact, tmp_path / "result")
    assert platform == "tensorrt_plan"
    assert engine == tmp_path / "result" / "model.plan"
    assert engine.read_bytes() == b"not-a-real-plan\x00\x01"
    assert set(files) == {"model.plan.json"}
    assert json.loads(files["model.plan.json"].read_text()) == {"tensorrt_version": "10.0"}
    engine, platform, files = save_engine(
        Artifact("onnx", "generic", onnx_path=tiny_mlp_onnx), tmp_path / "plain"
    )
    assert (engine.name, platform) == ("model.onnx", "onnxruntime_onnx")


def test_publish_plan_result_as_new_model(tiny_mlp_onnx: Path, tmp_path: Path) -> None:
    artifact = _fake_plan(tmp_path / "build", tiny_mlp_onnx)
    engine, platform, files = save_engine(artifact, tmp_path / "result")
    report = tmp_path / "result" / "report.json"
    report.write_text(json.dumps({"winner": {"id": "c3"}}))
    result = {
        "platform": platform,
        "engine_file": str(engine),
        "original_file": str(tiny_mlp_onnx),
        "files": {**{k: str(v) for k, v in files.items()}, "report.json": str(report)},
    }
    (tmp_path / "repo").mkdir()
    repository = ModelRepository(tmp_path / "repo")
    published = publish_result(repository, "mlp", result, job_id="j1")
    assert (published.source_version, published.version) == (1, 2)
    root = tmp_path / "repo" / "mlp"
    assert (root / "1" / "model.onnx").is_file()
    assert (root / "2" / "model.plan").read_bytes() == engine.read_bytes()
    assert (root / "2" / "model.plan.json").is_file()
    entry = repository.entry("mlp")
    assert entry.ok, entry.error
    assert entry.config.platform == "tensorrt_plan"
    assert not entry.config.default_model_filename
    assert entry.config.version_policy.latest.num_versions == 1
    assert [v.version for v in entry.versions] == [2]  # the ONNX original is not claimed
    assert [i.name for i in entry.config.input] == ["x"]
    saved = json.loads((root / "2" / "report.json").read_text())
    assert saved["source_version"] == 1
