"""Variable-length batching with real ONNX Runtime: a small masked-attention encoder.

Callers with different sequence lengths share batches (padded, then trimmed back) and each
gets what running its own sequence alone gives; similar lengths are grouped together.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry

from serving.backends import load_engine
from serving.batching import DynamicBatcher, MultiObserver
from serving.errors import InvalidInput, RepositoryError
from serving.manager import ModelManager, ModelState
from serving.metrics import ServerMetrics
from serving.ragged import RaggedSpec
from tests.fakes import until
from tests.models import config, write_model
from tests.serving.manager_runner import run

VOCAB, WIDTH = 50, 16
RAGGED_PARAMETERS = {
    "variable_length_inputs": {"string_value": "input_ids,attention_mask"},
    "variable_length_outputs": {"string_value": "last_hidden_state"},
    "pad_value": {"string_value": "input_ids=0"},
}


def encoder_model(seed: int = 0) -> bytes:
    """One masked self-attention layer over token embeddings, plus a masked mean pool.

    ``input_ids``/``attention_mask`` INT64 ``[batch, seq]`` -> ``last_hidden_state``
    ``[batch, seq, 16]`` and ``pooled`` ``[batch, 16]``. Padded keys get -1e9 before the
    softmax, so real positions do not depend on how much padding follows them.
    """
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)

    inits = [
        weight("embed", VOCAB, WIDTH),
        weight("wq", WIDTH, WIDTH),
        weight("wk", WIDTH, WIDTH),
        weight("wo", WIDTH, WIDTH),
        numpy_helper.from_array(np.array(WIDTH**-0.5, np.float32), "scale"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(1e9, np.float32), "big"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([-1], np.int64), "axis_last"),
    ]
    node = helper.make_node
    nodes = [
        node("Gather", ["embed", "input_ids"], ["h"]),
        node("MatMul", ["h", "wq"], ["q"]),
        node("MatMul", ["h", "wk"], ["k"]),
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["raw"]),
        node("Mul", ["raw", "scale"], ["scores"]),
        node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        node("Sub", ["maskf", "one"], ["negated"]),
        node("Mul", ["negated", "big"], ["bias2d"]),
        node("Unsqueeze", ["bias2d", "axis1"], ["bias"]),
        node("Add", ["scores", "bias"], ["masked"]),
        node("Softmax", ["masked"], ["attn"], axis=-1),
        node("MatMul", ["attn", "h"], ["ctx"]),
        node("MatMul", ["ctx", "wo"], ["proj"]),
        node("Tanh", ["proj"], ["last_hidden_state"]),
        node("Unsqueeze", ["maskf", "axis_last"], ["mask3"]),
        node("Mul", ["last_hidden_state", "mask3"], ["kept"]),
        node("ReduceSum", ["kept", "axis1"], ["total"], keepdims=0),
        node("ReduceSum", ["maskf", "axis_last"], ["count"], keepdims=1),
        node("Div", ["total", "count"], ["pooled"]),
    ]
    graph = helper.make_graph(
        nodes,
        "masked_encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info(
                "last_hidden_state", TensorProto.FLOAT, ["batch", "seq", WIDTH]
            ),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", WIDTH]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def encoder_config(*, ragged: bool = True, max_batch_size: int = 8, delay_us: int = 2000, **extra):
    data: dict = {
        "name": "encoder",
        "platform": "onnxruntime_onnx",
        "max_batch_size": max_batch_size,
        "dynamic_batching": {"max_queue_delay_microseconds": delay_us, **extra},
    }
    if ragged:
        data["parameters"] = dict(RAGGED_PARAMETERS)
    return data


def sequence(rng: np.random.Generator, length: int, rows: int = 1) -> dict[str, np.ndarray]:
    return {
        "input_ids": rng.integers(1, VOCAB, size=(rows, length)).astype(np.int64),
        "attention_mask": np.ones((rows, length), np.int64),
    }


class Recorder:
    """Batch sizes and padding the batcher reports."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.padding: list[tuple[int, int]] = []

    def batch_executed(self, batch_size, compute_input_ns, compute_infer_ns, compute_output_ns):
        self.batches.append(batch_size)

    def batch_padding(self, real_tokens: int, computed_tokens: int) -> None:
        self.padding.append((real_tokens, computed_tokens))


class Gated:
    """A real engine that holds its first batch until released and records each batch."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.inputs, self.outputs, self.device = engine.inputs, engine.outputs, engine.device
        self.release = threading.Event()
        self.running = threading.Event()
        self.shapes: list[tuple[int, ...]] = []

    def infer(self, inputs, output_names=None):
        self.running.set()
        self.release.wait(10)
        self.shapes.append(inputs["input_ids"].shape)
        return self.engine.infer(inputs, output_names)

    def close(self) -> None:
        self.engine.close()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("encoder") / "model.onnx"
    path.write_bytes(encoder_model())
    return path


def engine_for(model_file: Path, data: dict):
    return load_engine(model_file, config(data))


# ---------------------------------------------------------------------------- config


def _spec(parameters: dict, max_batch_size: int = 8) -> RaggedSpec | None:
    data = {"max_batch_size": max_batch_size, "parameters": parameters}
    return RaggedSpec.from_config(
        config(data),
        ["input_ids", "attention_mask", "token_type_ids"],
        ["last_hidden_state", "pooled"],
    )


def test_spec_parses_names_and_pad_values():
    spec = _spec(
        {
            "variable_length_inputs": {
                "string_value": " input_ids, attention_mask ,token_type_ids"
            },
            "variable_length_outputs": {"string_value": "last_hidden_state"},
            "pad_value": {"string_value": "input_ids=3, token_type_ids=1"},
        }
    )
    assert spec is not None
    assert spec.pad_values == {"input_ids": 3.0, "attention_mask": 0.0, "token_type_ids": 1.0}
    assert spec.outputs == {"last_hidden_state"}
    everywhere = _spec(
        {
            "variable_length_inputs": {"string_value": "input_ids"},
            "pad_value": {"string_value": "2"},
        }
    )
    assert everywhere.pad_values == {"input_ids": 2.0}
    assert everywhere.outputs == frozenset()
    assert _spec({}) is None


@pytest.mark.parametrize(
    ("parameters", "max_batch_size", "message"),
    [
        ({"variable_length_inputs": {"string_value": "ids"}}, 8, r"names ids, not a model input"),
        (
            {
                "variable_length_inputs": {"string_value": "input_ids"},
                "variable_length_outputs": {"string_value": "logits"},
            },
            8,
            "names logits, not a model output",
        ),
        ({"variable_length_inputs": {"string_value": " , "}}, 8, "names no input"),
        (
            {"variable_length_outputs": {"string_value": "pooled"}},
            8,
            "needs 'variable_length_inputs'",
        ),
        ({"variable_length_inputs": {"string_value": "input_ids"}}, 0, r"max_batch_size > 0"),
        (
            {
                "variable_length_inputs": {"string_value": "input_ids,attention_mask"},
                "pad_value": {"string_value": "attention_mask=1"},
            },
            8,
            "must pad with 0",
        ),
        (
            {
                "variable_length_inputs": {"string_value": "input_ids"},
                "pad_value": {"string_value": "input_ids=zero"},
            },
            8,
            "expected a number",
        ),
        (
            {
                "variable_length_inputs": {"string_value": "input_ids"},
                "variable_length_grouping": {"string_value": "sometimes"},
            },
            8,
            "use true or false",
        ),
        (
            {
                "variable_length_inputs": {"string_value": "input_ids"},
                "pad_value": {"string_value": "attention_mask=0"},
            },
            8,
            "not in 'variable_length_inputs'",
        ),
    ],
)
def test_bad_configs_name_the_parameter(parameters, max_batch_size, message):
    with pytest.raises(RepositoryError, match=message):
        _spec(parameters, max_batch_size)


def test_requests_with_inconsistent_sequence_axes_are_rejected(model_file):
    async def main():
        batcher = DynamicBatcher(
            [engine_for(model_file, encoder_config())], config(encoder_config())
        )
        ids = np.ones((1, 5), np.int64)
        with pytest.raises(InvalidInput, match=r"disagree on the sequence length \(5 .* 4"):
            await batcher.submit({"input_ids": ids, "attention_mask": np.ones((1, 4), np.int64)})
        with pytest.raises(InvalidInput, match="needs \\[batch, sequence"):
            await batcher.submit({"input_ids": ids[0], "attention_mask": ids[0]})
        await batcher.close()

    asyncio.run(main())


# ------------------------------------------------------------------------- batching


def test_concurrent_callers_of_random_lengths_get_their_own_outputs(model_file):
    """Many callers, random lengths 1..40 (some with 2 rows): each gets exactly what running
    its sequence alone gives, in fewer executions than requests, with padding reported."""
    data = encoder_config(max_batch_size=8, delay_us=3000)
    alone = engine_for(model_file, data)
    recorder = Recorder()
    metrics = ServerMetrics(CollectorRegistry())
    rng = np.random.default_rng(5)
    requests = [
        sequence(rng, int(rng.integers(1, 41)), rows=1 + int(i % 7 == 0)) for i in range(60)
    ]

    async def main():
        batcher = DynamicBatcher(
            [engine_for(model_file, data)],
            config(data),
            observer=MultiObserver([recorder, metrics.observer("encoder", "1")]),
        )
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.close()
        return results

    results = asyncio.run(main())
    for request, (outputs, timings) in zip(requests, results, strict=True):
        want = alone.infer(request)
        rows, length = request["input_ids"].shape
        assert outputs["last_hidden_state"].shape == (rows, length, WIDTH)
        assert outputs["pooled"].shape == (rows, WIDTH)
        np.testing.assert_allclose(
            outputs["last_hidden_state"], want["last_hidden_state"], atol=1e-5
        )
        np.testing.assert_allclose(outputs["pooled"], want["pooled"], atol=1e-5)
        assert timings.batch_size >= rows
    assert sum(recorder.batches) == sum(r["input_ids"].shape[0] for r in requests)
    assert len(recorder.batches) < len(requests) / 2  # different lengths really merged
    assert len(recorder.padding) == len(recorder.batches)
    real = sum(r for r, _ in recorder.padding)
    computed = sum(c for _, c in recorder.padding)
    assert real == sum(r["input_ids"].size for r in requests)
    assert 0 < real < computed  # some padding was computed, and counted
    labels = {"model": "encoder", "version": "1"}
    sample = metrics.registry.get_sample_value
    assert sample("slimserve_batch_padding_ratio_count", labels) == len(recorder.batches)
    assert sample("slimserve_batch_tokens_total", {**labels, "kind": "computed"}) == computed
    assert sample("slimserve_batch_tokens_total", {**labels, "kind": "real"}) == real
    assert "slimserve_batch_padding_ratio_bucket" in metrics.render()[0].decode()


def _queue_behind_first(model_file, data, lengths, priorities=None):
    """Hold the engine on one request, queue ``lengths`` in order, release; returns the
    batches' input shapes, the requests' outputs and inputs."""
    gated = Gated(engine_for(model_file, data))
    rng = np.random.default_rng(11)
    requests = [sequence(rng, n) for n in lengths]
    priorities = priorities or [0] * len(lengths)

    async def main():
        batcher = DynamicBatcher([gated], config(data))
        first = asyncio.ensure_future(batcher.submit(sequence(rng, 3)))
        await until(gated.running.is_set)
        tasks = [
            asyncio.ensure_future(batcher.submit(r, priority=p))
            for r, p in zip(requests, priorities, strict=True)
        ]
        await until(lambda: batcher.queue_depth == len(requests))
        gated.release.set()
        await first
        results = await asyncio.gather(*tasks)
        await batcher.close()
        return results

    results = asyncio.run(main())
    return gated.shapes[1:], results, requests


def test_similar_lengths_are_grouped_when_more_wait_than_fit(model_file):
    lengths = [40, 4, 41, 5, 42, 6, 43, 7, 44, 8, 45, 9, 46, 10, 47, 11]
    data = encoder_config(max_batch_size=4, delay_us=0)
    shapes, results, requests = _queue_behind_first(model_file, data, lengths)
    alone = engine_for(model_file, data)
    for request, (outputs, _) in zip(requests, results, strict=True):
        np.testing.assert_allclose(
            outputs["last_hidden_state"], alone.infer(request)["last_hidden_state"], atol=1e-5
        )
    computed = sum(rows * width for rows, width in shapes)
    fifo = sum(4 * max(lengths[i : i + 4]) for i in range(0, len(lengths), 4))
    assert [rows for rows, _ in shapes] == [4, 4, 4, 4]
    assert shapes[0] == (4, 43)  # the oldest (40) and its nearest lengths, not 40/4/41/5
    assert computed < 0.7 * fifo  # FIFO pads every short sequence to 40+


def test_grouping_can_be_turned_off(model_file):
    lengths = [40, 4, 41, 5, 42, 6, 43, 7]
    data = encoder_config(max_batch_size=4, delay_us=0)
    data["parameters"]["variable_length_grouping"] = {"string_value": "false"}
    shapes, results, _ = _queue_behind_first(model_file, data, lengths)
    assert shapes == [(4, 41), (4, 43)]  # first come, first served: padded, not grouped
    assert [t.batch_size for _, t in results] == [4] * 8


def test_grouping_keeps_priorities(model_file):
    """High-priority requests go first whatever their lengths; grouping only picks among
    the level that does not fit whole (here: the short level-2 requests join the short
    level-1 ones, the long ones run together next)."""
    lengths = [30, 3, 31, 4, 32, 5, 33, 6]
    priorities = [2, 1, 2, 2, 2, 1, 2, 2]
    data = encoder_config(max_batch_size=4, delay_us=0, priority_levels=2)
    shapes, results, _ = _queue_behind_first(model_file, data, lengths, priorities)
    assert shapes == [(4, 6), (4, 33)]
    assert [t.batch_size for _, t in results] == [4] * 8
    first = [
        n
        for n, (_, t) in zip(lengths, results, strict=True)
        if t.queue_ns
        < min(t2.queue_ns for n2, (_, t2) in zip(lengths, results, strict=True) if n2 >= 30)
    ]
    assert sorted(first) == [3, 4, 5, 6]


def test_a_model_not_marked_variable_length_never_pads(model_file):
    lengths = [6, 9, 6, 9, 6, 9]
    data = encoder_config(ragged=False, max_batch_size=8, delay_us=0)
    shapes, results, requests = _queue_behind_first(model_file, data, lengths)
    assert sorted(shapes) == [(3, 6), (3, 9)]  # one batch per length, nothing padded
    for request, (outputs, _) in zip(requests, results, strict=True):
        assert outputs["last_hidden_state"].shape[1] == request["input_ids"].shape[1]


# -------------------------------------------------------------------------- manager


def test_served_through_the_manager_and_bad_configs_fail_the_load(tmp_path: Path):
    repo = tmp_path / "repo"
    write_model(repo, "encoder", encoder_model(), model_config=encoder_config())
    bad = encoder_config()
    bad["parameters"] = {"variable_length_inputs": {"string_value": "token_ids"}}
    bad["name"] = "broken"
    write_model(repo, "broken", encoder_model(), model_config=bad)
    rng = np.random.default_rng(2)
    requests = [sequence(rng, n) for n in (3, 17, 9, 25)]

    async def body(manager: ModelManager):
        status = manager.record("broken").versions[1]
        assert status.state == ModelState.UNAVAILABLE
        assert "variable_length_inputs" in status.reason
        assert "token_ids" in status.reason
        loaded = manager.get("encoder")
        with loaded.use():
            return await asyncio.gather(*(loaded.batcher.submit(r) for r in requests))

    results = run(repo, body)
    engine = engine_for(repo / "encoder" / "1" / "model.onnx", encoder_config())
    for request, (outputs, _) in zip(requests, results, strict=True):
        np.testing.assert_allclose(
            outputs["last_hidden_state"], engine.infer(request)["last_hidden_state"], atol=1e-5
        )


def test_http_answers_400_for_inconsistent_sequence_lengths(tmp_path: Path):
    """Through the real app: a mismatched request is a 400 naming both lengths; good ones
    come back trimmed to their own length, and /metrics carries the padding ratio."""
    import time

    import orjson
    from fastapi.testclient import TestClient

    from serving.app import build_server_app
    from serving.settings import Settings

    repo = tmp_path / "repo"
    write_model(repo, "encoder", encoder_model(), model_config=encoder_config())

    def infer_body(ids: list[list[int]], mask: list[list[int]]) -> bytes:
        tensors = [("input_ids", ids), ("attention_mask", mask)]
        inputs = [
            {"name": n, "shape": [len(v), len(v[0])], "datatype": "INT64", "data": v}
            for n, v in tensors
        ]
        return orjson.dumps({"inputs": inputs, "outputs": [{"name": "last_hidden_state"}]})

    with TestClient(build_server_app(Settings(repository=repo))) as client:
        deadline = time.monotonic() + 60
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.02)
        url = "/v2/models/encoder/infer"
        bad = client.post(url, content=infer_body([[1, 2, 3, 4, 5]], [[1, 1, 1, 1]]))
        assert bad.status_code == 400
        assert "disagree on the sequence length (5" in bad.json()["error"]
        good = client.post(url, content=infer_body([[1, 2, 3]], [[1, 1, 1]]))
        assert good.status_code == 200, good.text
        assert good.json()["outputs"][0]["shape"] == [1, 3, WIDTH]
        metrics = client.get("/metrics").text
        assert 'slimserve_batch_padding_ratio_count{model="encoder",version="1"} 1.0' in metrics
