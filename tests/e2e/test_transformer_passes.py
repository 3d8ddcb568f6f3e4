"""Upload -> optimization job -> served version, for each transformer pass.

A tiny random-init BERT (Hugging Face folder: config.json, model.safetensors, tokenizer) is
uploaded with ``allow``/``require: [pass]`` for ``struct_prune``, ``token_prune`` and
``pack_padding`` (with calibration text, except structured pruning: it runs on the built-in
text, which brings enough sentences for structured OBS). The job must run the pass and serve
its result; the newly served version must answer exactly as its published ONNX file run
directly, with the fidelity to the original that the report recorded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optimizers.calibration import pydoc_sentences
from optimizers.fidelity import compare
from tests.e2e.helpers import folder_tar_gz, infer_input, run_direct
from tests.e2e.server import RemoteServer
from tests.e2e.test_upload_pipeline import upload, wait_job
from tests.optimizers.tiny import tiny_bert_checkpoint

MIN_COSINE = 0.9
REQUEST = {"batch_size": 4, "seq_len": 32, "min_cosine": MIN_COSINE, "time_budget_s": 240}
# ``require`` makes the search serve a candidate holding the pass even where it times slower
# than the original: padding removal cannot win at the search's timing shape (one batch
# without padding), and timings of a tiny model on a loaded machine are noise.


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("transformer_passes")
    folder = tiny_bert_checkpoint(root / "tiny-bert", layers=2, seed=3)
    archive = folder_tar_gz(folder)
    sentences = pydoc_sentences()[:400:4]
    repo = root / "repository"
    repo.mkdir()
    with RemoteServer(repo, env={"SLIMSERVE_JOBS_DIR": str(root / "jobs")}) as server:
        yield {
            "server": server,
            "repo": repo,
            "archive": archive,
            "calibration": "\n".join(sentences[:80]).encode(),
            "held_out": sentences[80:],
            "tokenizer": folder,
        }


def _feeds(tokenizer_dir: Path, texts: list[str], names: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="np")
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in names}


@pytest.mark.slow
@pytest.mark.parametrize("technique", ["struct_prune", "token_prune", "pack_padding"])
def test_pass_runs_through_upload_job_and_serving(setup: dict[str, Any], technique: str) -> None:
    server, repo = setup["server"], setup["repo"]
    name = f"bert_{technique}"
    # structured pruning runs on the built-in text (no calibration file): the path that
    # brings enough sentences for structured OBS; the others get the user's calibration text
    files = (
        {} if technique == "struct_prune" else {"calibration": ("texts.txt", setup["calibration"])}
    )
    response = upload(
        server,
        ("tiny-bert.tar.gz", setup["archive"]),
        {"name": name, "allow": [technique], "require": [technique], **REQUEST},
        **files,
    )
    assert response.status_code == 202, response.text
    job = wait_job(server, response.json()["url"], timeout_s=300)
    assert job["state"] == "succeeded", (job["error"], job["log_tail"])
    source, version = job["source_version"], job["published_version"]
    report = json.loads((repo / name / str(version) / "report.json").read_text())

    # the job ran the pass: its candidate was built and measured against the original
    ran = [c for c in report["candidates"] if c["passes"] == [technique]]
    assert ran, [(c["label"], c["status"], c["reason"]) for c in report["candidates"]]
    for candidate in ran:
        assert candidate["fidelity"], candidate["reason"]  # built and measured, not failed
        assert candidate["latency_ms"], candidate["reason"]
    if technique == "pack_padding":
        assert ran[0]["fidelity"]["cosine"] > 0.9999  # exact up to float error
    if technique == "struct_prune":
        (pruning,) = [r for r in ran[0]["pass_reports"] if r["pass"] == "struct_prune"]
        assert "structured OBS" in pruning["technique"], pruning["obs"]
        assert pruning["obs"]["held_out_cosine"] > pruning["obs"]["held_out_cosine_baseline"]
    winner = report["winner"]
    assert winner["passes"] == [technique], [(c["label"], c["reason"]) for c in ran]
    assert report["require"]["met"] is True
    assert winner["fidelity"]["cosine"] >= MIN_COSINE

    # the new version is served and answers exactly as its published ONNX file
    client = server.client()
    assert client.is_model_ready(name, str(version))
    metadata = client.get_model_metadata(name, str(version))
    names = [spec["name"] for spec in metadata["inputs"]]
    output = metadata["outputs"][0]["name"]
    texts = setup["held_out"]
    batches = [_feeds(setup["tokenizer"], texts[i : i + 4], names) for i in range(0, 16, 4)]
    served, original = [], []
    for feeds in batches:
        assert len(set(feeds["attention_mask"].sum(1).tolist())) > 1  # padded batches
        inputs = [infer_input(n, feeds[n]) for n in names]
        result = client.infer(name, inputs, model_version=str(version))
        assert result.get_response()["model_version"] == str(version)
        got = result.as_numpy(output)
        direct = run_direct(repo / name / str(version) / "model.onnx", feeds)[output]
        np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-4)
        served.append([got])
        # the original stays in the repository as the source version (not served)
        original.append([run_direct(repo / name / str(source) / "model.onnx", feeds)[output]])
    # fidelity to the original on held-out text, as the report measured it on its own
    fidelity = compare(original, served, batches, family="transformer")
    assert fidelity["cosine"] >= MIN_COSINE - 0.05, (fidelity, winner["fidelity"])
    assert abs(fidelity["cosine"] - winner["fidelity"]["cosine"]) < 0.05, (fidelity, winner)
