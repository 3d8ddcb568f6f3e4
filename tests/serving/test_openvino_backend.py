"""``cpu_execution_accelerator { name: "openvino" }``: ONNX Runtime's OpenVINO plugin EP."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from serving.backends import openvino
from serving.backends.onnxruntime import OnnxRuntimeEngine
from serving.model_config import parse_config
from tests.e2e.helpers import infer_input
from tests.models import mlp_model, write_model

REASON = openvino.unavailable_reason()
needs_plugin = pytest.mark.skipif(
    REASON is not None, reason=f"OpenVINO plugin EP not usable here: {REASON}"
)
OV_CONFIG = """
    name: "mlp"
    parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
    optimization { execution_accelerators { cpu_execution_accelerator : [ {
      name : "openvino"
      parameters { key: "INFERENCE_PRECISION_HINT" value: "f32" }
    } ] } }
"""


def _mlp(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    path.write_bytes(mlp_model(width=256, depth=3))
    return path


@needs_plugin
def test_engine_runs_on_openvino_and_matches_cpu(tmp_path: Path) -> None:
    model = _mlp(tmp_path)
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    ov = OnnxRuntimeEngine(model, parse_config(OV_CONFIG))
    cpu = OnnxRuntimeEngine(model, parse_config('name: "mlp"'))
    assert ov.accelerator == "openvino"
    assert ov.providers[0] == openvino.EP_NAME
    assert cpu.accelerator is None
    assert openvino.EP_NAME not in cpu.providers
    got, want = ov.infer({"x": x})["y"], cpu.infer({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_missing_plugin_falls_back_to_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def missing() -> None:
        raise ImportError("onnxruntime-ep-openvino is not installed")

    monkeypatch.setattr(openvino, "_device", missing)
    with caplog.at_level(logging.WARNING):
        engine = OnnxRuntimeEngine(_mlp(tmp_path), parse_config(OV_CONFIG))
    assert engine.accelerator is None
    assert engine.providers == ["CPUExecutionProvider"]
    assert "'openvino' unavailable" in caplog.text
    assert engine.infer({"x": np.ones((2, 64), np.float32)})["y"].shape == (2, 10)


def test_properties_pass_through() -> None:
    props = openvino.cpu_properties({"INFERENCE_PRECISION_HINT": "bf16", "NUM_STREAMS": 1}, 2)
    assert props == {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": "2",
        "INFERENCE_PRECISION_HINT": "bf16",
        "NUM_STREAMS": "1",
    }


@needs_plugin
def test_server_serves_through_openvino(tmp_path: Path, start_server) -> None:
    repo = tmp_path / "repo"
    model = mlp_model(width=256, depth=3)
    accel = {"name": "openvino", "parameters": {"INFERENCE_PRECISION_HINT": "f32"}}
    for name, optimization in (
        ("mlp_ov", {"execution_accelerators": {"cpu_execution_accelerator": [accel]}}),
        ("mlp_cpu", {}),
    ):
        config = {"platform": "onnxruntime_onnx", "max_batch_size": 8}
        if optimization:
            config["optimization"] = optimization
        write_model(repo, name, model, model_config=config)
    server = start_server(repo, "--log-level", "info")
    client = server.client()
    try:
        x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
        outs = {
            name: client.infer(name, [infer_input("x", x)]).as_numpy("y")
            for name in ("mlp_ov", "mlp_cpu")
        }
    finally:
        client.close()
    np.testing.assert_allclose(outs["mlp_ov"], outs["mlp_cpu"], rtol=1e-4, atol=1e-4)
    assert "mlp_ov: cpu_execution_accelerator 'openvino'" in server.log
    assert "mlp_cpu: cpu_execution_accelerator" not in server.log


def test_publish_names_the_accelerator_the_winner_was_measured_on(tmp_path: Path) -> None:
    from serving.jobs.publish import publish_result, rollback
    from serving.model_config import read_config
    from serving.repository import ModelRepository
    from tests.serving.test_jobs_publish import result_files

    (tmp_path / "repo").mkdir()
    repository = ModelRepository(tmp_path / "repo")
    model = mlp_model(width=32, depth=2)
    engine = {"engine": {"platform": "onnxruntime_onnx", "cpu_execution_accelerator": "openvino"}}
    result = result_files(tmp_path, model, model, report=engine)

    def accelerators(name: str) -> list[str]:
        config = read_config(repository.root / name)
        return [
            a.name for a in config.optimization.execution_accelerators.cpu_execution_accelerator
        ]

    publish_result(repository, "fresh", result, job_id="j1")
    assert accelerators("fresh") == ["openvino"]
    write_model(repository.root, "old", model, model_config={"max_batch_size": 4})
    before = (repository.root / "old" / "config.pbtxt").read_bytes()
    published = publish_result(repository, "old", result, job_id="j2")
    assert accelerators("old") == ["openvino"]
    assert read_config(repository.root / "old").max_batch_size == 4  # the rest is kept
    publish_result(repository, "old", result, job_id="j3")  # already named: left as it is
    assert accelerators("old") == ["openvino"]
    rollback(repository, published)
    assert (repository.root / "old" / "config.pbtxt").read_bytes() == before
    plain = result_files(tmp_path, model, model, report={"engine": {}})
    publish_result(repository, "plain", plain, job_id="j4")
    assert accelerators("plain") == []


def test_static_shapes_parse_and_reject_clearly() -> None:
    spec = "input_ids[8,128], attention_mask[8,128]; input_ids[1,128],attention_mask[1,128]"
    assert openvino.parse_static_shapes(spec) == [
        {"input_ids": (8, 128), "attention_mask": (8, 128)},
        {"input_ids": (1, 128), "attention_mask": (1, 128)},
    ]
    assert openvino.reshape_input({"x": (4, 64)}) == "x[4,64]"
    for bad, words in (
        ("x[4,-1]", "positive integer"),
        ("x[4,a]", "positive integer"),
        ("x[]", "positive integer"),
        ("x 4,64", "cannot read"),
        ("x[4,64],x[2,64]", "twice"),
        (" ; ", "no shape set"),
    ):
        with pytest.raises(ValueError, match=words):
            openvino.parse_static_shapes(bad)


def _static_config(spec: str) -> str:
    return OV_CONFIG.replace(
        'value: "f32" }',
        f'value: "f32" }}\n      parameters {{ key: "static_shapes" value: "{spec}" }}',
    )


@needs_plugin
def test_static_shape_session_serves_its_shape_and_the_rest_stays_dynamic(tmp_path: Path) -> None:
    model = _mlp(tmp_path)
    engine = OnnxRuntimeEngine(model, parse_config(_static_config("x[4,64];x[1,64]")))
    cpu = OnnxRuntimeEngine(model, parse_config('name: "mlp"'))
    assert [shapes for shapes, _ in engine.static_sessions] == [{"x": (4, 64)}, {"x": (1, 64)}]
    rng = np.random.default_rng(2)
    for rows, static in ((4, 0), (1, 1), (3, None)):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        chosen = engine.session_for({"x": x})
        if static is None:
            assert chosen is engine.session
        else:
            assert chosen is engine.static_sessions[static][1]
        got, want = engine.infer({"x": x})["y"], cpu.infer({"x": x})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the static session really is static: OpenVINO refuses any other shape on it
    with pytest.raises(Exception, match=r"(?i)shape"):
        engine.static_sessions[0][1].run(None, {"x": np.ones((3, 64), np.float32)})


@needs_plugin
@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("tokens[4,64]", "names input 'tokens'"),
        ("x[4,32]", "does not allow"),
        ("x[4,64,1]", "does not allow"),
        ("x[4;64]", "cannot read"),
    ],
)
def test_bad_static_shapes_fail_the_load_with_the_reason(
    tmp_path: Path, spec: str, words: str
) -> None:
    from serving.errors import RepositoryError

    with pytest.raises(RepositoryError, match=words):
        OnnxRuntimeEngine(_mlp(tmp_path), parse_config(_static_config(spec)))


@needs_plugin
def test_server_answers_through_a_static_shape_session(tmp_path: Path, start_server) -> None:
    repo = tmp_path / "repo"
    model = mlp_model(width=256, depth=3)
    plain = {"name": "openvino", "parameters": {"INFERENCE_PRECISION_HINT": "f32"}}
    static = {"name": "openvino", "parameters": {**plain["parameters"], "static_shapes": "x[4,64]"}}
    broken = {"name": "openvino", "parameters": {"static_shapes": "y[4,64]"}}
    for name, accel in (("mlp_static", static), ("mlp_plain", plain), ("mlp_broken", broken)):
        config = {
            "platform": "onnxruntime_onnx",
            "max_batch_size": 8,
            "optimization": {"execution_accelerators": {"cpu_execution_accelerator": [accel]}},
        }
        write_model(repo, name, model, model_config=config)
    server = start_server(repo, "--log-level", "info")
    client = server.client()
    try:
        rng = np.random.default_rng(3)
        for rows in (4, 2):  # the static shape, then one only the dynamic session takes
            x = rng.standard_normal((rows, 64)).astype(np.float32)
            outs = {
                name: client.infer(name, [infer_input("x", x)]).as_numpy("y")
                for name in ("mlp_static", "mlp_plain")
            }
            np.testing.assert_allclose(outs["mlp_static"], outs["mlp_plain"], rtol=1e-4, atol=1e-4)
        assert client.is_model_ready("mlp_static")
        assert not client.is_model_ready("mlp_broken")
    finally:
        client.close()
    assert "mlp_static: OpenVINO static-shape sessions for x[4,64]" in server.log
    assert "static_shapes names input 'y'" in server.log


def test_publish_carries_the_static_shape_the_winner_was_timed_at(tmp_path: Path) -> None:
    from serving.jobs.publish import publish_result
    from serving.model_config import read_config
    from serving.repository import ModelRepository
    from tests.serving.test_jobs_publish import result_files

    (tmp_path / "repo").mkdir()
    repository = ModelRepository(tmp_path / "repo")
    model = mlp_model(width=32, depth=2)

    def engine(shapes: str) -> dict:
        return {
            "engine": {
                "platform": "onnxruntime_onnx",
                "cpu_execution_accelerator": "openvino",
                "static_shapes": shapes,
            }
        }

    def parameters() -> list[dict[str, str]]:
        config = read_config(repository.root / "m")
        accels = config.optimization.execution_accelerators.cpu_execution_accelerator
        return [dict(a.parameters) for a in accels]

    publish_result(
        repository, "m", result_files(tmp_path, model, model, report=engine("x[8,64]")), job_id="j1"
    )
    assert parameters() == [{"static_shapes": "x[8,64]"}]
    publish_result(
        repository, "m", result_files(tmp_path, model, model, report=engine("x[1,64]")), job_id="j2"
    )
    assert parameters() == [{"static_shapes": "x[1,64]"}]  # one accelerator, shape updated
