"""Winograd F(2x2,3x3): equals direct convolution, keeps the demo model's accuracy, declines."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from optimizers.cnn import graph, timing, winograd, winograd_select
from tests.optimizers.cnn.conftest import accuracy


def _direct(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pads) -> np.ndarray:
    top, left, bottom, right = pads
    xt = torch.nn.functional.pad(torch.from_numpy(x.astype(np.float64)), (left, right, top, bottom))
    bias = None if b is None else torch.from_numpy(b.astype(np.float64))
    return torch.nn.functional.conv2d(xt, torch.from_numpy(w.astype(np.float64)), bias).numpy()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 6),
    out_channels=st.integers(1, 6),
    height=st.integers(1, 11),
    width=st.integers(1, 11),
    pads=st.tuples(*[st.integers(0, 2)] * 4),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
    tile=st.sampled_from([2, 4]),
)
def test_winograd_onnx_equals_direct_convolution(
    batch, channels, out_channels, height, width, pads, with_bias, seed, tile
):
    top, left, bottom, right = pads
    if height + top + bottom < 3 or width + left + right < 3:
        return  # no output
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, height, width)).astype(np.float32)
    w = rng.standard_normal((out_channels, channels, 3, 3)).astype(np.float32)
    b = rng.standard_normal(out_channels).astype(np.float32) if with_bias else None
    info = winograd.ConvInfo(None, w, b, pads, (batch, channels, height, width))
    model = winograd.single_conv_model(info, batch, winograd=True, m=tile)
    ops = {node.op_type for node in model.graph.node}
    assert "Conv" not in ops
    assert "MatMul" in ops
    out = timing.session(model).run(None, {"x": x})[0]
    reference = _direct(x, w, b, pads)
    assert out.shape == reference.shape
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    np.testing.assert_allclose(
        winograd.winograd_conv_numpy(x, w, pads, tile)
        + (0 if b is None else b[None, :, None, None]),
        reference,
        atol=1e-9 * max(1.0, np.abs(reference).max()),
    )


@pytest.mark.parametrize(("tile", "products"), [(2, 16), (4, 36)])
def test_weights_pretransformed_and_products_are_batched_matmuls(tile, products):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    info = winograd.ConvInfo(None, w, None, (1, 1, 1, 1), (2, 4, 6, 6))
    model = winograd.single_conv_model(info, 2, winograd=True, m=tile)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    u = inits["wino/u"]
    assert u.shape == (products, 8, 4)  # U = G g Gᵀ, one [K, C] matrix per tile position
    np.testing.assert_allclose(u, winograd.transform_weights(w, tile))
    products_node = [
        n for n in model.graph.node if n.op_type == "MatMul" and n.input[0] == "wino/u"
    ]
    assert len(products_node) == 1  # one batched MatMul [t*t, K, C] x [t*t, C, N*P]
    # multiplies per output: direct 9*C*K, Winograd (t*t/m*m)*C*K
    assert products / tile**2 < 9


def _model_with(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize(
    ("kernel", "attrs", "reason"),
    [
        ((8, 4, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}, "stride"),
        ((8, 4, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, "dilation"),
        ((8, 2, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}, "groups"),
        ((8, 4, 5, 5), {"pads": [2, 2, 2, 2]}, "kernel 5x5"),
        ((8, 4, 1, 1), {}, "kernel 1x1"),
    ],
)
def test_declines_layers_it_cannot_handle_with_reason(kernel, attrs, reason):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal(kernel).astype(np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    model = _model_with([conv], [w], [1, 4, 8, 8], None)
    model.graph.output[0].type.tensor_type.ClearField("shape")
    chosen, rows = winograd_select.select(model, winograd_select.SelectOptions(min_speedup=0))
    assert chosen == {}
    assert rows[0]["choice"] == "direct"
    assert reason in rows[0]["reason"]


def test_declines_dynamic_spatial_shape():
    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    model = _model_with([conv], [w], ["n", 1, "h", "w"], None)
    shapes = graph.static_shapes(model)
    assert "spatial shape unknown" in winograd.check_conv(model, conv, shapes)


@pytest.mark.parametrize("tile", [2, 4])
def test_demo_model_rewritten_keeps_accuracy(digits_model, digits_splits, tmp_path, tile):
    model = graph.load(digits_model)
    shapes = graph.static_shapes(model, 1)
    infos = [winograd.check_conv(model, n, shapes) for n in model.graph.node if n.op_type == "Conv"]
    assert all(isinstance(i, winograd.ConvInfo) for i in infos), infos
    rewritten = winograd.rewrite(model, infos, tile)
    onnx.checker.check_model(rewritten)
    assert not [n for n in rewritten.graph.node if n.op_type == "Conv"]
    path = graph.save(rewritten, tmp_path / "wino.onnx")
    original, fast = timing.session(digits_model), timing.session(path)
    x, y = digits_splits.x_test, digits_splits.y_test
    assert accuracy(fast, x, y) == accuracy(original, x, y)
    np.testing.assert_allclose(
        fast.run(None, {"input": x})[0], original.run(None, {"input": x})[0], atol=1e-4
    )


def test_select_measures_every_conv_and_reports(digits_model):
    model = graph.load(digits_model)
    options = winograd_select.SelectOptions(batch_size=4, repeats=3, min_speedup=0.0)
    chosen, rows = winograd_select.select(model, options)
    assert len(rows) == 2
    assert len(chosen) == 2  # min_speedup 0: kept whenever accurate
    for row in rows:
        assert row["direct_ms"] > 0
        assert row["f2_ms"] > 0
        assert row["f4_ms"] > 0
        assert row["f2_max_rel_error"] < 1e-5
        assert row["f4_max_rel_error"] < 1e-4
        assert row["tile"] in (2, 4)
    strict = winograd_select.SelectOptions(batch_size=4, repeats=3, max_rel_error=0.0)
    chosen, rows = winograd_select.select(model, strict)
    assert chosen == {}
    assert all("over bound" in r["reason"] for r in rows)
