"""ModelManager with real ONNX Runtime engines, in process (no HTTP)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from serving.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    RepositoryError,
)
from serving.manager import ModelManager, ModelState, instance_count, warmup_requests
from serving.metrics import ServerMetrics
from serving.repository import ModelRepository
from serving.settings import Settings
from tests.models import config, scaled_model, write_model
from tests.serving.manager_runner import run

SCALED = {"platform": "onnxruntime_onnx", "max_batch_size": 4, "dynamic_batching": {}}


async def infer(manager: ModelManager, name: str, value: float = 1.0, version: int | None = None):
    loaded = manager.get(name, version)
    with loaded.use():
        outputs, _ = await loaded.batcher.submit({"x": np.full((1, 4), value, np.float32)})
    return loaded.version, float(outputs["y"][0, 0])


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    write_model(root, "double", scaled_model(2.0), model_config=SCALED)
    write_model(root, "triple", scaled_model(3.0), versions=(1, 2), model_config=SCALED)
    return root


def test_mode_none_loads_everything(repo: Path) -> None:
    async def body(manager: ModelManager) -> None:
        assert manager.ready
        assert await infer(manager, "double") == (1, 2.0)
        assert await infer(manager, "triple") == (2, 3.0)  # default policy: newest only
        assert manager.index() == [
            {"name": "double", "version": "1", "state": "READY", "reason": ""},
            {"name": "triple", "version": "2", "state": "READY", "reason": ""},
        ]
        with pytest.raises(ModelNotFound, match="has no version 1"):
            manager.get("triple", 1)
        with pytest.raises(ModelNotFound, match="'nope' is not in the repository"):
            manager.get("nope")
        with pytest.raises(InvalidInput, match="invalid model name"):
            manager.get("../etc")
        with pytest.raises(Forbidden, match="not allowed in model control mode 'none'"):
            await manager.load("double")
        with pytest.raises(Forbidden):
            await manager.unload("double")

    run(repo, body)


def test_explicit_mode_loads_on_request(repo: Path) -> None:
    async def body(manager: ModelManager) -> None:
        assert await infer(manager, "double") == (1, 2.0)
        with pytest.raises(ModelNotReady, match="not loaded; load it with POST"):
            manager.get("triple")
        await manager.load("triple")
        assert await infer(manager, "triple") == (2, 3.0)
        await manager.unload("double")
        with pytest.raises(ModelNotReady, match="unloaded"):
            manager.get("double")
        assert {"name": "double", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"} in (
            manager.index()
        )
        with pytest.raises(ModelNotFound):
            await manager.load("missing")

    run(repo, body, model_control_mode="explicit", startup_models=["double"])


def test_load_with_files_and_config_publishes_and_rolls_back(repo: Path) -> None:
    async def body(manager: ModelManager) -> None:
        cfg = config({**SCALED, "max_batch_size": 2})
        await manager.load("fresh", config=cfg, files={"1/model.onnx": scaled_model(5.0)})
        assert await infer(manager, "fresh") == (1, 5.0)
        assert manager.get("fresh").config.max_batch_size == 2
        with pytest.raises(Conflict, match="already has version"):
            await manager.load("fresh", files={"1/model.onnx": scaled_model(6.0)})
        with pytest.raises(RepositoryError, match="failed to load 'fresh'"):
            await manager.load("fresh", files={"2/model.onnx": b"garbage"})
        assert not (repo / "fresh" / "2").exists()  # the refused upload is gone again
        assert await infer(manager, "fresh") == (1, 5.0)
        with pytest.raises(InvalidInput, match="escapes"):
            await manager.load("fresh", files={"3/../../evil": b"x"})
        with pytest.raises(InvalidInput, match="names model 'other'"):
            await manager.load("fresh", config=config({"name": "other"}))

    run(repo, body, model_control_mode="explicit")


def test_hot_reload_waits_for_requests_on_the_old_version(repo: Path) -> None:
    async def body(manager: ModelManager) -> None:
        old = manager.get("double")
        with old.use():
            (repo / "double" / "1" / "model.onnx").write_bytes(scaled_model(4.0))
            reload = asyncio.create_task(manager.reload("double"))
            for _ in range(200):
                if manager.get("double") is not old:
                    break
                await asyncio.sleep(0.02)
            new = manager.get("double")
            assert new is not old
            assert await infer(manager, "double") == (1, 4.0)
            # the old version still runs what it holds
            outputs, _ = await old.batcher.submit({"x": np.ones((1, 4), np.float32)})
            assert float(outputs["y"][0, 0]) == 2.0
            assert not reload.done()
            assert old.state is ModelState.UNLOADING
        await asyncio.wait_for(reload, 10)
        with pytest.raises(Exception, match="unloading"):
            await old.batcher.submit({"x": np.ones((1, 4), np.float32)})

    run(repo, body, model_control_mode="explicit", startup_models=["*"])


def test_poll_once_picks_up_changes(repo: Path) -> None:
    async def body(manager: ModelManager) -> None:
        write_model(repo, "double", scaled_model(7.0), versions=(2,))
        write_model(repo, "late", scaled_model(9.0), model_config=SCALED)
        await manager.poll_once()
        assert await infer(manager, "double") == (2, 7.0)
        assert await infer(manager, "late") == (1, 9.0)
        shutil.rmtree(repo / "triple")
        await manager.poll_once()
        with pytest.raises(ModelNotFound):
            manager.get("triple")
        # a broken edit does not take the served version down
        (repo / "late" / "config.pbtxt").write_text("max_batch_size: 'x'")
        await manager.poll_once()
        assert await infer(manager, "late") == (1, 9.0)
        row = next(r for r in manager.index() if r["name"] == "late")
        assert row["state"] == "READY"
        assert manager.record("late").error

    run(repo, body, model_control_mode="poll", poll_interval_s=3600)


def test_broken_models_are_reported_not_fatal(repo: Path) -> None:
    write_model(repo, "corrupt", b"not onnx at all")
    bad_warmup = {
        **SCALED,
        "model_warmup": [
            {"name": "wrong", "batch_size": 1, "inputs": {"nope": {"data_type": "TYPE_FP32",
                                                               "dims": [4], "zero_data": True}}}
        ],
    }  # fmt: skip
    write_model(repo, "warmup_fails", scaled_model(1.0), model_config=bad_warmup)

    async def body(manager: ModelManager) -> None:
        assert manager.ready
        assert await infer(manager, "double") == (1, 2.0)
        rows = {r["name"]: r for r in manager.index()}
        assert rows["corrupt"]["state"] == "UNAVAILABLE"
        assert rows["corrupt"]["reason"]
        assert rows["warmup_fails"]["state"] == "UNAVAILABLE"
        assert "warm-up 'wrong' failed" in rows["warmup_fails"]["reason"]
        with pytest.raises(ModelNotReady, match="warm-up"):
            manager.get("warmup_fails")
        ready, reason = manager.is_ready("corrupt")
        assert not ready
        assert reason

    run(repo, body)


def test_instances_and_warmup_requests(tmp_path: Path) -> None:
    cfg = config({**SCALED, "instance_group": [{"count": 2, "kind": "KIND_CPU"}, {"count": 1}]})
    assert instance_count(cfg) == 3
    assert instance_count(config({})) == 1
    warm = config(
        {
            **SCALED,
            "model_warmup": [
                {"name": "r", "batch_size": 3, "count": 2,
                 "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [4], "random_data": True}}},
                {"name": "f", "batch_size": 1,
                 "inputs": {"x": {"data_type": "TYPE_INT32", "dims": [4],
                                  "input_data_file": "x.bin"}}},
            ],
        }
    )  # fmt: skip
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "x.bin").write_bytes(np.arange(4, dtype=np.int32).tobytes())
    requests = warmup_requests(warm, [], tmp_path)
    assert [(n, a["x"].shape, c) for n, a, c in requests] == [("r", (3, 4), 2), ("f", (1, 4), 1)]
    assert requests[0][1]["x"].std() > 0
    np.testing.assert_array_equal(requests[1][1]["x"], [[0, 1, 2, 3]])

    from serving.backends import TensorSpec

    specs = [
        TensorSpec("a", "FP32", (-1, 4)),
        TensorSpec("s", "BYTES", (-1,)),
        TensorSpec("attention_mask", "INT64", (-1, -1)),
    ]
    (default,) = warmup_requests(config(SCALED), specs, tmp_path)
    assert default[1]["a"].shape == (1, 4)
    assert not default[1]["a"].any()
    assert default[1]["s"].tolist() == [b""]
    assert default[1]["attention_mask"].tolist() == [[1]], "one real token, not all padding"

    repo = tmp_path / "repo"
    write_model(repo, "multi", scaled_model(2.0), model_config={**SCALED, "instance_group": [
        {"count": 2, "kind": "KIND_CPU"}]})  # fmt: skip

    async def body(manager: ModelManager) -> None:
        assert len(manager.get("multi").engines) == 2
        results = await asyncio.gather(*(infer(manager, "multi", float(i)) for i in range(8)))
        assert [v for _, v in results] == [2.0 * i for i in range(8)]

    run(repo, body)


def test_close_finishes_queued_requests(repo: Path) -> None:
    async def main() -> list[tuple[int, float]]:
        manager = ModelManager(
            ModelRepository(repo), ServerMetrics(CollectorRegistry()), Settings(repository=repo)
        )
        await manager.start()
        await manager.wait_started()
        calls = [asyncio.create_task(infer(manager, "double", float(i))) for i in range(10)]
        await asyncio.sleep(0)
        await manager.close(5)
        assert not manager.ready
        return await asyncio.gather(*calls)

    assert [v for _, v in asyncio.run(main())] == [2.0 * i for i in range(10)]
