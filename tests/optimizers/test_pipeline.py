"""The whole pipeline on tiny real models: candidates measured, dropped with reasons, the
winner inside the bound, report.json / report.png written, failures never crash the job."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from optimizers import registry
from optimizers.api import OptimizationRequest, run_optimization
from optimizers.calibration import pydoc_sentences, tokenize
from optimizers.chains import build_chains
from optimizers.fidelity import compare, mean_pool
from optimizers.onnxutil import make_session
from optimizers.passes.base import Artifact, Cancelled, Pass, PassContext, PassResult
from optimizers.report import REQUIRED_KEYS, read_report, validate

GENERIC_PASSES = (
    "ort_transformer_optimize",
    "ort_graph_optimize",
    "quantize_dynamic",
    "quantize_static",
    "fp16",
    "lowrank",
)


def _check_candidates(report: dict) -> None:
    assert validate(report) == []
    for candidate in report["candidates"]:
        assert candidate["status"] in ("kept", "dropped")
        assert candidate["reason"]
        if candidate["status"] == "kept":
            assert candidate["latency_ms"] > 0
            assert "cosine" in candidate["fidelity"]
            assert candidate["size_bytes"] > 0


@pytest.fixture(scope="module")
def bert_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("bert_run")
    texts = pydoc_sentences()[:40]
    calibration = folder / "calibration.txt"
    calibration.write_text("\n".join(texts) + "\n")
    events: list[dict] = []
    # the framework's own passes (technique packages test their chains themselves)
    request = OptimizationRequest(
        name="tiny-bert", batch_size=4, seq_len=32, min_cosine=0.99, allow=GENERIC_PASSES
    )
    result = run_optimization(
        tiny_bert_dir, request, folder / "job", calibration=calibration, progress=events.append
    )
    return result, events, texts


def test_bert_report_lists_every_candidate(bert_run) -> None:
    result, _events, _texts = bert_run
    report = result.report
    assert set(REQUIRED_KEYS) <= set(report)
    _check_candidates(report)
    chains, _skipped = build_chains("transformer", "cpu", GENERIC_PASSES)
    measured = {tuple(c["passes"]) for c in report["candidates"]}
    for chain in chains:
        assert tuple(name for name, _ in chain) in measured
    assert report["candidates"][0]["passes"] == []  # the original is a candidate too
    assert report["source"]["format"] == "huggingface"
    assert report["shapes"]["batch_size"] == 4
    assert report["shapes"]["inputs"]["input_ids"] == [4, 32]
    assert report["baseline"]["pytorch_eager"]["latency_ms"] > 0
    assert report["baseline"]["latency_ms"] > 0
    assert report["calibration"] == {
        "source": "calibration.txt",
        "synthetic": False,
        "examples": {"calibration": 20, "eval": 20},
        "labels": False,
    }
    assert report["export"]["exporter"] in ("dynamo", "legacy")


def test_bert_winner_within_bound_measured_directly(bert_run, tiny_bert_dir: Path) -> None:
    result, _events, texts = bert_run
    winner = result.report["winner"]
    assert winner["fidelity"]["cosine"] >= 0.99
    kept = [c for c in result.report["candidates"] if c["status"] == "kept"]
    assert winner["latency_ms"] == min(c["latency_ms"] for c in kept)
    # recompute fidelity with onnxruntime directly on the published files
    feeds = tokenize(
        tiny_bert_dir, texts[20:], 32, ["input_ids", "attention_mask", "token_type_ids"]
    )
    original = make_session(result.original_file).run(None, feeds)[0]
    engine = make_session(result.engine_file).run(None, feeds)[0]
    a = mean_pool(original, feeds["attention_mask"])
    b = mean_pool(engine, feeds["attention_mask"])
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.mean() >= 0.99
    assert abs(cosine.mean() - winner["fidelity"]["cosine"]) < 5e-3


def test_bert_report_files_written(bert_run) -> None:
    result, _events, _texts = bert_run
    assert result.platform == "onnxruntime_onnx"
    assert result.engine_file.name == "model.onnx"
    png = result.files["report.png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000
    on_disk = read_report(result.files["report.json"].parent)
    assert on_disk["winner"]["id"] == result.report["winner"]["id"]
    assert len(on_disk["candidates"]) == len(result.report["candidates"])


def test_bert_progress_events(bert_run) -> None:
    _result, events, _texts = bert_run
    stages = [e["stage"] for e in events]
    for stage in ("load", "export", "calibrate", "baseline", "search", "report", "done"):
        assert stage in stages
    assert all(set(e) == {"stage", "message", "fraction", "candidate"} for e in events)
    fractions = [e["fraction"] for e in events if e["fraction"] is not None]
    assert fractions == sorted(fractions)
    assert any(e["candidate"] for e in events if e["stage"] == "search")


def test_cnn_with_labels_and_accuracy_bound(tiny_cnn_onnx: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    labels = make_session(tiny_cnn_onnx).run(None, {"image": images})[0].argmax(1)
    labels[::4] = (labels[::4] + 1) % 5  # the original is 75% accurate on these labels
    np.savez(tmp_path / "calib.npz", image=images, labels=labels)
    request = OptimizationRequest(name="cnn", batch_size=4, min_cosine=None, max_accuracy_drop=0.05)
    result = run_optimization(
        tiny_cnn_onnx, request, tmp_path / "job", calibration=tmp_path / "calib.npz"
    )
    report = result.report
    _check_candidates(report)
    assert report["family"] == "cnn"
    assert report["baseline"]["pytorch_eager"] is None
    base = report["candidates"][0]["fidelity"]
    assert base["reference_accuracy"] == pytest.approx(0.75)
    assert base["accuracy_drop"] == 0.0
    assert report["winner"]["fidelity"]["accuracy_drop"] <= 0.05
    assert report["calibration"]["labels"] is True
    assert report["calibration"]["synthetic"] is False


def test_synthetic_data_is_flagged(tiny_mlp_onnx: Path, tmp_path: Path) -> None:
    request = OptimizationRequest(name="mlp", batch_size=8, allow=("quantize_dynamic",))
    result = run_optimization(tiny_mlp_onnx, request, tmp_path / "job")
    assert result.report["calibration"]["synthetic"] is True
    assert "synthetic" in result.report["fidelity_note"]
    assert [c["passes"] for c in result.report["candidates"]] == [[], ["quantize_dynamic"]]
    assert all("not allowed" in s["reason"] for s in result.report["skipped_chains"])


class _Boom(Pass):
    name = "test_boom"

    @dataclass(frozen=True)
    class Config:
        message: str = "boom"

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        raise RuntimeError(self.config.message)


class _Sleepy(Pass):
    name = "test_sleepy"

    @dataclass(frozen=True)
    class Config:
        seconds: float = 0.0

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        time.sleep(self.config.seconds)
        ctx.check_cancelled()
        return PassResult(artifact, True, {})


@pytest.fixture
def extra_passes(monkeypatch: pytest.MonkeyPatch):
    """Register test-only passes and chains without leaking them into other tests."""
    registry.available_passes()
    monkeypatch.setitem(registry._PASSES, "test_boom", registry.register_pass(_Boom))
    monkeypatch.setitem(registry._PASSES, "test_sleepy", _Sleepy)
    monkeypatch.setitem(registry._CHAINS, "generic", [])
    return registry._CHAINS["generic"]


def test_failing_pass_is_recorded_not_fatal(
    tiny_mlp_onnx: Path, tmp_path: Path, extra_passes: list
) -> None:
    registry.register_chains("generic", [["test_boom", "quantize_dynamic"]])
    request = OptimizationRequest(name="mlp", allow=("test_boom", "quantize_dynamic"))
    result = run_optimization(tiny_mlp_onnx, request, tmp_path / "job")
    by_passes = {tuple(c["passes"]): c for c in result.report["candidates"]}
    boom = by_passes[("test_boom",)]
    assert boom["status"] == "dropped"
    assert "failed" in boom["reason"]
    assert "boom" in boom["reason"]
    child = by_passes[("test_boom", "quantize_dynamic")]
    assert child["status"] == "dropped"
    assert "was dropped" in child["reason"]
    assert by_passes[("quantize_dynamic",)]["status"] in ("kept", "dropped")
    assert result.engine_file.is_file()


def test_time_budget_skips_remaining_candidates(
    tiny_mlp_onnx: Path, tmp_path: Path, extra_passes: list
) -> None:
    registry.register_chains(
        "generic", [[("test_sleepy", {"seconds": 4.0})], ["test_boom", "quantize_dynamic"]]
    )
    request = OptimizationRequest(
        name="mlp", time_budget_s=3.0, allow=("test_sleepy", "test_boom", "quantize_dynamic")
    )
    result = run_optimization(tiny_mlp_onnx, request, tmp_path / "job")
    reasons = {c["label"]: c["reason"] for c in result.report["candidates"]}
    assert "time budget" in reasons["test_sleepy(seconds=4.0)"]
    assert "time budget" in reasons["test_boom"]
    assert "time budget" in reasons["test_boom -> quantize_dynamic"]
    skipped = [c for c in result.report["candidates"] if "time budget" in c["reason"]]
    assert all(c["status"] == "dropped" for c in skipped)
    kept = {c["id"] for c in result.report["candidates"] if c["status"] == "kept"}
    assert result.report["winner"]["id"] in kept  # measured before the budget ran out


def test_cancel_raises_and_publishes_nothing(tiny_mlp_onnx: Path, tmp_path: Path) -> None:
    cancel = threading.Event()

    def on_progress(event: dict) -> None:
        if event["stage"] == "search":
            cancel.set()

    with pytest.raises(Cancelled):
        run_optimization(
            tiny_mlp_onnx,
            OptimizationRequest(name="mlp"),
            tmp_path / "job",
            progress=on_progress,
            cancel_event=cancel,
        )
    assert not (tmp_path / "job" / "result").exists()


def test_pt2_archive_accepted(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)
    ).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(4, 64),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "mlp.pt2")
    request = OptimizationRequest(name="mlp", batch_size=4, allow=("quantize_dynamic",))
    result = run_optimization(tmp_path / "mlp.pt2", request, tmp_path / "job")
    report = result.report
    assert report["source"]["format"] == "torch.export"
    assert report["baseline"]["pytorch_eager"]["latency_ms"] > 0
    _check_candidates(report)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    got = make_session(result.original_file).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_compare_matches_direct_computation() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 5, 8)).astype(np.float32)
    cand = ref + 0.1 * rng.standard_normal(ref.shape).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    metrics = compare([[ref]], [[cand]], [{"attention_mask": mask}], family="transformer")
    pooled_a = np.stack([ref[0, :3].mean(0), ref[1].mean(0)])
    pooled_b = np.stack([cand[0, :3].mean(0), cand[1].mean(0)])
    direct = [
        float(pooled_a[i] @ pooled_b[i] / np.linalg.norm(pooled_a[i]) / np.linalg.norm(pooled_b[i]))
        for i in range(2)
    ]
    assert metrics["cosine"] == pytest.approx(np.mean(direct), abs=1e-6)
    assert metrics["cosine_min"] == pytest.approx(min(direct), abs=1e-6)
    real = mask.astype(bool)
    assert metrics["max_abs_error"] == pytest.approx(
        float(np.abs(ref[real] - cand[real]).max()), rel=1e-6
    )
    # values at padding positions are not outputs (a packed graph writes zeros there)
    cand[0, 3:] = 1e3
    again = compare([[ref]], [[cand]], [{"attention_mask": mask}], family="transformer")
    assert again == metrics


def _eager_on(target: str) -> tuple[dict, str]:
    import torch

    from optimizers.measure import MeasureSettings
    from optimizers.pipeline import _eager_latency

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
    feeds = {"input": np.ones((4, 16), np.float32)}
    settings = MeasureSettings(warmup=1, min_repeats=2, max_repeats=3)
    result = _eager_latency(model, Artifact("torch", "generic"), feeds, settings, target)
    return result, next(model.parameters()).device.type


def test_eager_baseline_on_the_cpu_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("PyTorch sees a CUDA GPU here")
    result, device = _eager_on("cuda")
    assert result["providers"] == ["pytorch-eager"]
    assert device == "cpu"


@pytest.mark.gpu
def test_eager_baseline_runs_on_the_gpu_for_gpu_targets() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA GPU")
    result, device = _eager_on("cuda")
    assert result["providers"] == ["pytorch-eager-cuda"]
    assert result["latency_ms"] > 0
    assert device == "cpu", "the module is back on the CPU for the passes after it"
    assert _eager_on("cpu")[0]["providers"] == ["pytorch-eager"]
