"""CNN students: narrowing keeps the important filters, the interpreter matches ONNX Runtime,
the pass trains a smaller student that agrees with the teacher, refuses small data, cancels."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import optimizers.distill.passes  # noqa: F401  (registers the distill pass)
from optimizers.distill.cnn import count_parameters, graph_flops, narrow
from optimizers.distill.onnx_module import OnnxModule
from optimizers.passes.base import Artifact, Cancelled, PassContext, PassNotApplicable
from optimizers.registry import get_pass


def _run(path: Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    data = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _ctx(tmp_path: Path, x: np.ndarray, **kwargs) -> PassContext:
    batches = [{"input": x[i : i + 64]} for i in range(0, len(x), 64)]
    calibration = {"inputs": batches, "synthetic": False, "source": "digits train split"}
    return PassContext(workdir=tmp_path, calibration=calibration, batch_size=8, **kwargs)


def test_interpreter_matches_onnxruntime(digits_onnx, digits_split):
    x_test = digits_split[1]
    module = OnnxModule(onnx.load(str(digits_onnx)))
    with torch.no_grad():
        ours = module(torch.from_numpy(x_test))[0].numpy()
    np.testing.assert_allclose(ours, _run(digits_onnx, x_test), rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in module.parameters()) == count_parameters(module.to_onnx())


def test_narrow_keeps_largest_filters_and_shrinks(digits_onnx, digits_split):
    teacher = onnx.load(str(digits_onnx))
    student, layers = narrow(teacher, 0.5)
    assert [(layer.channels, layer.kept) for layer in layers] == [(16, 8), (32, 16), (64, 32)]
    assert count_parameters(student) < 0.3 * count_parameters(teacher)
    assert graph_flops(student) < 0.3 * graph_flops(teacher)
    first_conv = next(n for n in teacher.graph.node if n.op_type == "Conv").input[1]
    before = onnx.numpy_helper.to_array(
        next(i for i in teacher.graph.initializer if i.name == first_conv)
    )
    after = onnx.numpy_helper.to_array(
        next(i for i in student.graph.initializer if i.name == first_conv)
    )
    norms = np.abs(before).reshape(16, -1).sum(1)
    kept = np.sort(np.argsort(-norms)[:8])
    np.testing.assert_array_equal(after, before[kept])
    assert _run(student, digits_split[1]).shape == (len(digits_split[1]), 10)
    assert narrow(teacher, 1.0)[1] == []


def test_pass_trains_a_smaller_student_that_agrees(digits_onnx, digits_split, tmp_path):
    x_train, x_test, _y_train, y_test = digits_split
    events: list[tuple[str, float | None]] = []
    ctx = _ctx(tmp_path, x_train, progress=lambda m, f: events.append((m, f)))
    distill = get_pass(
        "distill", width_fraction=0.5, lr=3e-3, max_steps=50, eval_every=10, batch_size=64
    )
    teacher = Artifact("onnx", "cnn", onnx_path=digits_onnx)
    result = distill.run(teacher, ctx)
    report = result.report
    student_path = result.artifact.onnx_path
    assert result.modified
    assert result.artifact.meta["distilled"]
    assert report["student"]["parameters"] < 0.3 * report["teacher"]["parameters"]
    assert report["student"]["flops"] < 0.3 * report["teacher"]["flops"]
    training = report["training"]
    assert training["last_loss"] < 0.5 * training["first_loss"]
    assert training["best_fidelity"] > training["initial_fidelity"] + 0.05
    assert training["best_fidelity"] >= 0.9
    assert Path(report["plot"]).stat().st_size > 1000
    assert report["speed"]["teacher_ms"] > 0
    assert report["speed"]["student_ms"] > 0
    assert any("held-out top-1 agreement" in message for message, _ in events)
    teacher_acc = (_run(digits_onnx, x_test).argmax(1) == y_test).mean()
    student_acc = (_run(student_path, x_test).argmax(1) == y_test).mean()
    assert student_acc >= teacher_acc - 0.05


def test_refuses_too_little_data(digits_onnx, digits_split, tmp_path):
    ctx = _ctx(tmp_path, digits_split[0][:40])
    with pytest.raises(PassNotApplicable, match=r"at least 80 unlabeled examples.*got 40"):
        get_pass("distill").run(Artifact("onnx", "cnn", onnx_path=digits_onnx), ctx)


def test_refuses_without_user_data(digits_onnx, digits_split, tmp_path):
    ctx = _ctx(tmp_path, digits_split[0])
    ctx.calibration["synthetic"] = True
    with pytest.raises(PassNotApplicable, match="user's unlabeled data"):
        get_pass("distill").run(Artifact("onnx", "cnn", onnx_path=digits_onnx), ctx)


def test_cancel_stops_training_promptly(digits_onnx, digits_split, tmp_path):
    cancel = threading.Event()
    ctx = _ctx(tmp_path, digits_split[0], cancel_event=cancel)
    ctx.progress = lambda message, fraction: cancel.set()
    distill = get_pass("distill", eval_every=2, max_steps=10_000, time_budget_s=300)
    start = time.monotonic()
    with pytest.raises(Cancelled):
        distill.run(Artifact("onnx", "cnn", onnx_path=digits_onnx), ctx)
    assert time.monotonic() - start < 60


def test_time_budget_keeps_a_reserve_for_export_and_measurement(
    digits_onnx, digits_split, tmp_path
):
    from optimizers.distill.config import DistillConfig
    from optimizers.distill.passes import finish_reserve

    assert finish_reserve(DistillConfig(time_budget_s=600)) == 30.0
    assert finish_reserve(DistillConfig(time_budget_s=10)) == pytest.approx(1.0)
    assert finish_reserve(DistillConfig(time_budget_s=600, finish_reserve_s=0)) == 0.0
    distill = get_pass("distill", time_budget_s=10, eval_every=20, batch_size=64, patience=10_000)
    result = distill.run(
        Artifact("onnx", "cnn", onnx_path=digits_onnx), _ctx(tmp_path, digits_split[0])
    )
    report = result.report
    assert report["training"]["stop_reason"] == "time_budget"
    # training stopped at the budget less the 1 s reserve (plus at most one step and the
    # final evaluation); the pass then reports its whole duration
    assert report["training"]["training_seconds"] < 9.5
    assert report["pass_seconds"] >= report["training"]["training_seconds"]
    assert report["time_budget_s"] == 10
