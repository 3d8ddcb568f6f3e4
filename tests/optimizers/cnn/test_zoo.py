"""Reference CNNs: pretrained MobileNetV2 recognizes a real photo; ResNet-style prunes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from optimizers.cnn import data, graph, prune, timing, zoo

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.slow
def test_pretrained_mobilenet_v2_sees_the_cat_and_exports_faithfully(tmp_path):
    try:
        model = zoo.mobilenet_v2()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    photos = data.sample_photos()
    x, _ = data.photo_crops({"chelsea": photos["chelsea"]}, 224, per_photo=1)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    assert int(logits.argmax()) in IMAGENET_CATS
    path = zoo.export(model, tmp_path / "mnv2.onnx", 224)
    ort_logits = timing.session(path).run(None, {"input": x})[0]
    np.testing.assert_allclose(ort_logits, logits, atol=1e-3)


def test_resnet_style_prunes_inside_blocks_and_declines_residual_outputs(tmp_path):
    net = zoo.resnet_style(widths=(8, 16, 16, 16), blocks=(1, 1, 1, 1), classes=10)
    model = graph.load(zoo.export(net, tmp_path / "rs.onnx", 32))
    rng = np.random.default_rng(0)
    calibration = [{"input": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)}]
    pruned, report = prune.prune_channels(model, calibration, prune.PruneOptions(0.6))
    onnx.checker.check_model(pruned)
    assert {layer["name"].split("/")[-2] for layer in report["layers"]} == {"conv1"}
    assert any("residual" in row["reason"] or "Add" in row["reason"] for row in report["declined"])
    assert report["macs_after"] < report["macs_before"]
    x = calibration[0]["input"]
    assert timing.session(pruned).run(None, {"input": x})[0].shape == (4, 10)
