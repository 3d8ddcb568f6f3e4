"""Channel pruning on the real digits demo model: physical shrink, FLOPs, accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizers.cnn import graph, prune, timing
from optimizers.cnn.torch_graph import TorchGraph, UnsupportedGraph
from tests.optimizers.cnn.conftest import accuracy


@pytest.fixture(scope="module")
def calibration(digits_splits):
    x = digits_splits.calibration(512)
    return [{"input": x[i : i + 64]} for i in range(0, len(x), 64)]


def test_torch_interpreter_matches_onnxruntime(digits_model, digits_splits):
    x = digits_splits.x_test[:50]
    values = TorchGraph(graph.load(digits_model)).run({"input": x})
    reference = timing.session(digits_model).run(None, {"input": x})[0]
    np.testing.assert_allclose(values["logits"].numpy(), reference, atol=1e-4)


def test_interpreter_names_unsupported_operators():
    node = helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->ij")
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
    )
    with pytest.raises(UnsupportedGraph, match="Einsum"):
        TorchGraph(helper.make_model(g))


@pytest.mark.parametrize("budget", [0.5, 0.8])
def test_pruning_shrinks_physically_and_keeps_accuracy(
    digits_model, digits_splits, calibration, budget
):
    model = graph.load(digits_model)
    pruned, report = prune.prune_channels(model, calibration, prune.PruneOptions(budget))
    onnx.checker.check_model(pruned)
    before = {i.name: tuple(i.dims) for i in model.graph.initializer}
    after = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    kept = {layer["name"]: layer["kept"] for layer in report["layers"]}
    conv1, conv2 = "/features/features.0/Conv", "/features/features.2/Conv"
    assert after["features.0.weight"] == (kept[conv1], 1, 3, 3)
    assert after["features.0.bias"] == (kept[conv1],)
    assert after["features.2.weight"] == (kept[conv2], kept[conv1], 3, 3)
    assert after["head.1.weight"] == (64, kept[conv2] * 16)  # Flatten -> Gemm inputs shrink
    assert before["head.1.weight"] == (64, 512)
    assert report["macs_after"] <= budget * report["macs_before"] * 1.01
    assert report["macs_ratio"] < 1.0
    x, y = digits_splits.x_test, digits_splits.y_test
    drop = accuracy(timing.session(digits_model), x, y) - accuracy(timing.session(pruned), x, y)
    assert drop <= 0.02, (budget, drop, report["layers"])


def test_reestimation_recovers_accuracy_at_half_flops(digits_model, digits_splits, calibration):
    model = graph.load(digits_model)
    x, y = digits_splits.x_test, digits_splits.y_test
    plain, _ = prune.prune_channels(model, calibration, prune.PruneOptions(0.4, reestimate=False))
    fixed, report = prune.prune_channels(model, calibration, prune.PruneOptions(0.4))
    assert len(report["reestimated"]) == 2
    assert accuracy(timing.session(fixed), x, y) > accuracy(timing.session(plain), x, y)


def test_residual_branches_are_declined():
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["b"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "x"], ["y"], name="add"),
    ]
    g = helper.make_graph(
        nodes,
        "res",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [w1, w2],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    groups, declined = prune.find_groups(model, graph.static_shapes(model))
    assert [grp.conv.name for grp in groups] == ["c1"]
    assert declined == [{"name": "c2", "reason": "channels flow into Add"}]


def test_options_name_the_bad_field():
    with pytest.raises(ValueError, match="flops_budget"):
        prune.PruneOptions(flops_budget=0)
    with pytest.raises(ValueError, match="criterion"):
        prune.PruneOptions(criterion="l1")
