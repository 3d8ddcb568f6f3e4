"""Publishing a job's result into the repository, and taking it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from serving.errors import Conflict, InvalidInput
from serving.jobs.publish import publish_result, rollback
from serving.jobs.records import JobRecord, JobStore
from serving.model_config import read_config
from serving.repository import ModelRepository
from tests.models import add_sub_model, scaled_model, write_model


def result_files(tmp_path: Path, original: bytes, engine: bytes, **extra: object) -> dict:
    (tmp_path / "work").mkdir(exist_ok=True)
    (tmp_path / "work" / "original.onnx").write_bytes(original)
    (tmp_path / "work" / "winner.onnx").write_bytes(engine)
    (tmp_path / "work" / "report.json").write_text(json.dumps({"winner": "c1"}))
    return {
        "engine_file": str(tmp_path / "work" / "winner.onnx"),
        "platform": "onnxruntime_onnx",
        "files": {"report.json": str(tmp_path / "work" / "report.json")},
        "report": {},
        "original_file": str(tmp_path / "work" / "original.onnx"),
        "original_files": {},
        **extra,
    }


@pytest.fixture
def repository(tmp_path: Path) -> ModelRepository:
    (tmp_path / "repo").mkdir()
    return ModelRepository(tmp_path / "repo")


def test_new_model_gets_config_original_and_winner(tmp_path: Path, repository) -> None:
    result = result_files(tmp_path, add_sub_model(), add_sub_model())
    published = publish_result(repository, "fresh", result, job_id="j1")
    assert (published.version, published.source_version) == (2, 1)
    assert published.added_versions == [1, 2]
    assert published.report == {"winner": "c1", "source_version": 1, "job_id": "j1"}
    config = read_config(repository.root / "fresh")
    assert config.name == "fresh"
    assert config.max_batch_size == 8
    assert config.HasField("dynamic_batching")
    assert not config.input, "inputs and outputs are left to auto-complete"
    rollback(repository, published)
    assert not (repository.root / "fresh").exists()


def test_new_version_of_an_existing_model_keeps_its_config(tmp_path: Path, repository) -> None:
    write_model(repository.root, "m", scaled_model(1.0), model_config={"max_batch_size": 2})
    before = (repository.root / "m" / "config.pbtxt").read_bytes()
    result = result_files(tmp_path, scaled_model(2.0), scaled_model(2.0))
    published = publish_result(repository, "m", result, job_id="j2")
    assert published.added_versions == [2, 3], "a different original is published too"
    assert published.source_version == 2
    assert (repository.root / "m" / "config.pbtxt").read_bytes() == before
    rollback(repository, published)
    assert repository.version_numbers("m") == [1]
    assert (repository.root / "m" / "config.pbtxt").read_bytes() == before


def test_winner_timed_on_cuda_is_served_on_a_gpu_instance_group(tmp_path: Path, repository) -> None:
    result = result_files(
        tmp_path, add_sub_model(), add_sub_model(), report={"engine": {"device": "gpu"}}
    )
    published = publish_result(repository, "on_gpu", result, job_id="j3")
    config = read_config(repository.root / "on_gpu")
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (mc.ModelInstanceGroup.KIND_GPU, 1)
    ]
    assert config.HasField("dynamic_batching")
    rollback(repository, published)

    write_model(repository.root, "m", scaled_model(1.0), model_config={"max_batch_size": 2})
    before = (repository.root / "m" / "config.pbtxt").read_bytes()
    result = result_files(
        tmp_path, scaled_model(2.0), scaled_model(2.0), report={"engine": {"device": "gpu"}}
    )
    published = publish_result(repository, "m", result, job_id="j4")
    config = read_config(repository.root / "m")
    assert config.max_batch_size == 2, "the rest of an existing config is kept"
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    rollback(repository, published)
    assert (repository.root / "m" / "config.pbtxt").read_bytes() == before


def test_new_model_batches_up_to_the_jobs_batch_size(tmp_path: Path, repository) -> None:
    for name, batch, expected in (("big", 32, 32), ("small", 4, 8)):
        report = {"request": {"batch_size": batch}}
        publish_result(
            repository,
            name,
            result_files(tmp_path, add_sub_model(), add_sub_model(), report=report),
            job_id=name,
        )
        assert read_config(repository.root / name).max_batch_size == expected


def test_winner_timed_on_cpu_keeps_the_cpu_config(tmp_path: Path, repository) -> None:
    """A ``cuda`` job on a host without CUDA times on the CPU: nothing asks for a GPU."""
    result = result_files(tmp_path, add_sub_model(), add_sub_model(), report={"engine": {}})
    publish_result(repository, "on_cpu", result, job_id="j5")
    config = read_config(repository.root / "on_cpu")
    assert not any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in config.instance_group)


def test_platform_change_is_a_conflict(tmp_path: Path, repository) -> None:
    write_model(repository.root, "m", scaled_model(1.0))
    result = result_files(tmp_path, scaled_model(1.0), b"plan", platform="tensorrt_plan")
    with pytest.raises(Conflict, match="new model name"):
        publish_result(repository, "m", result, job_id="j3")
    assert repository.version_numbers("m") == [1]


def test_missing_engine_rolls_back_the_original(tmp_path: Path, repository) -> None:
    result = result_files(tmp_path, scaled_model(1.0), scaled_model(1.0))
    Path(result["engine_file"]).unlink()
    with pytest.raises(FileNotFoundError):
        publish_result(repository, "gone", result, job_id="j4")
    assert not (repository.root / "gone").exists()
    bad = result_files(tmp_path, scaled_model(1.0), scaled_model(1.0), platform="pytorch_libtorch")
    with pytest.raises(InvalidInput, match="cannot be served"):
        publish_result(repository, "gone", bad, job_id="j5")


def test_store_round_trip_skips_unreadable_records(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs")
    record = JobRecord(id="0123456789abcdef", model="m", request={"name": "m"})
    store.add(record)
    (tmp_path / "jobs" / "fedcba9876543210").mkdir()
    (tmp_path / "jobs" / "fedcba9876543210" / "job.json").write_text("{not json")
    (tmp_path / "jobs" / "not-a-job").mkdir()
    (tmp_path / "jobs" / "abcdefabcdef0000" / "upload").mkdir(parents=True)
    reopened = JobStore(tmp_path / "jobs")
    loaded = reopened.load()
    assert [r.to_dict() for r in loaded] == [record.to_dict()]
    removed = {p.name for p in reopened.remove_incomplete()}
    assert removed == {"abcdefabcdef0000"}, "only folders without a record file"
    assert (tmp_path / "jobs" / "not-a-job").is_dir(), "only job folders are touched"
    assert (tmp_path / "jobs" / record.id / "job.json").is_file()
