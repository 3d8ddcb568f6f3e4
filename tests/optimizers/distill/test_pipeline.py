"""The distill pass inside the real pipeline: only when allowed, trained on the uploaded
calibration data, measured by the search against the original, refused without data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from matplotlib import image as plt_image

import optimizers.distill.passes  # noqa: F401  (registers the distill pass)
from optimizers.api import OptimizationRequest, run_optimization
from optimizers.chains import build_chains


def _candidate(report: dict, passes: list[str]) -> dict:
    return next(c for c in report["candidates"] if c["passes"] == passes)


def test_distill_chains_only_when_allowed():
    default, skipped = build_chains("cnn", "cpu", None)
    assert all(name != "distill" for chain in default for name, _ in chain)
    assert any("distill" in s["passes"] and "opt-in" in s["reason"] for s in skipped)
    allowed, _ = build_chains("cnn", "cpu", ("distill", "ort_graph_optimize"))
    names = [[name for name, _ in chain] for chain in allowed]
    assert ["distill", "ort_graph_optimize"] in names
    assert ["distill"] in names  # distill -> cnn_static_int8, shortened
    none, skipped = build_chains("transformer", "cpu", ("quantize_dynamic",))
    assert all(name != "distill" for chain in none for name, _ in chain)
    assert any("distill" in s["passes"] for s in skipped)


def test_cnn_job_trains_and_measures_a_student(digits_onnx, digits_split, tmp_path):
    x_train, _x_test, y_train, _y_test = digits_split
    source = tmp_path / "digits.onnx"
    shutil.copyfile(digits_onnx, source)
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, input=x_train, labels=y_train)
    request = OptimizationRequest(
        name="digits",
        batch_size=64,
        min_cosine=None,
        max_accuracy_drop=0.05,
        time_budget_s=120,
        allow=("distill",),
    )
    events: list[dict] = []
    result = run_optimization(
        source, request, tmp_path / "job", calibration=calibration, progress=events.append
    )
    student = _candidate(result.report, ["distill"])
    assert student["fidelity"] is not None, student["reason"]
    distill_report = student["pass_reports"][0]
    assert distill_report["student"]["parameters"] < distill_report["teacher"]["parameters"] / 3
    assert distill_report["data"]["train"] + distill_report["data"]["held_out"] == len(x_train) // 2
    assert (
        distill_report["training"]["best_fidelity"] > distill_report["training"]["initial_fidelity"]
    )
    # measured by the search on the pipeline's own held-out half, against the original
    assert student["fidelity"]["top1_agreement"] >= 0.9
    assert student["fidelity"]["accuracy"] >= student["fidelity"]["reference_accuracy"] - 0.05
    assert any("distill: step" in (e["message"] or "") for e in events)
    # the held-out fidelity curve is published beside report.json and named by the report
    curve = result.files["distill_curve.png"]
    assert curve.parent == result.files["report.json"].parent
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _channels = plt_image.imread(curve).shape  # decodes the whole image
    assert (width, height) == (640, 360)  # plot_curve: 6.4 x 3.6 in at 100 dpi
    assert distill_report["plot_file"] == "distill_curve.png"
    assert "distill_curve.png" in result.report["plots"]
    on_disk = json.loads(result.files["report.json"].read_text())
    assert "distill_curve.png" in on_disk["plots"]


def test_job_without_calibration_reports_why_distill_was_refused(digits_onnx, tmp_path):
    request = OptimizationRequest(name="digits", batch_size=8, allow=("distill",))
    result = run_optimization(digits_onnx, request, tmp_path / "job")
    student = _candidate(result.report, ["distill"])
    assert student["status"] == "dropped"
    assert "not applicable" in student["reason"]
    assert "user's unlabeled data" in student["reason"]
    assert result.report["winner"]["passes"] == []


@pytest.mark.slow
def test_transformer_job_distills_a_hugging_face_checkpoint(tmp_path):
    from optimizers.distill.data import python_docs_sentences
    from tests.optimizers.tiny import tiny_bert_checkpoint

    folder = tiny_bert_checkpoint(tmp_path / "ckpt", layers=4)
    calibration = tmp_path / "texts.txt"
    calibration.write_text("\n".join(python_docs_sentences()[:400]) + "\n")
    request = OptimizationRequest(
        name="bert",
        batch_size=4,
        seq_len=32,
        min_cosine=0.5,
        time_budget_s=300,
        allow=("distill",),
    )
    result = run_optimization(folder, request, tmp_path / "job", calibration=calibration)
    student = _candidate(result.report, ["distill"])
    assert student["fidelity"] is not None, student["reason"]
    distill_report = student["pass_reports"][0]
    assert distill_report["student"]["layers"] == [0, 2]
    assert distill_report["student"]["parameters"] < distill_report["teacher"]["parameters"]
    assert student["fidelity"]["cosine"] > 0.9
