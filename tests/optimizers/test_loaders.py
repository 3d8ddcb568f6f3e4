"""Loading uploads: ONNX, HF checkpoints (folder / archive), .pt2; pickle and escapes refused."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from optimizers.loaders import load_source
from serving.errors import InvalidInput


def test_onnx_file_loads_and_family_detected(tiny_cnn_onnx: Path, tmp_path: Path) -> None:
    loaded = load_source(tiny_cnn_onnx, tmp_path)
    assert loaded.artifact.kind == "onnx"
    assert loaded.artifact.family == "cnn"
    assert loaded.description["format"] == "onnx"
    assert loaded.artifact.onnx_path.is_file()


def test_onnx_with_external_data_loads(tiny_mlp_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_mlp_onnx))
    folder = tmp_path / "upload"
    folder.mkdir()
    onnx.save_model(
        model,
        str(folder / "m.onnx"),
        save_as_external_data=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    loaded = load_source(folder, tmp_path / "work")
    assert loaded.artifact.family == "generic"
    reloaded = onnx.load(str(loaded.artifact.onnx_path))
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(reloaded.graph.initializer[0]),
        onnx.numpy_helper.to_array(onnx.load(str(tiny_mlp_onnx)).graph.initializer[0]),
    )


def test_onnx_external_data_escaping_refused(tiny_mlp_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_mlp_onnx))
    folder = tmp_path / "upload"
    folder.mkdir()
    onnx.save_model(
        model,
        str(tmp_path / "outside.onnx"),
        save_as_external_data=True,
        location="secret.data",
        size_threshold=0,
    )
    header = onnx.load(str(tmp_path / "outside.onnx"), load_external_data=False)
    for tensor in header.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.data"
    onnx.save_model(header, str(folder / "m.onnx"))
    with pytest.raises(InvalidInput, match="escapes"):
        load_source(folder / "m.onnx", tmp_path / "work")


def test_garbage_onnx_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(InvalidInput, match=r"bad\.onnx"):
        load_source(bad, tmp_path / "work")


def test_pickle_checkpoint_refused(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(InvalidInput, match="pickle"):
        load_source(path, tmp_path / "work")
    renamed = tmp_path / "weights.dat"
    import pickle

    renamed.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(InvalidInput, match="pickle"):
        load_source(renamed, tmp_path / "work")


def test_hf_checkpoint_with_only_pytorch_bin_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(tiny_bert_dir / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(InvalidInput, match="pickle"):
        load_source(folder, tmp_path / "work")


def test_unknown_model_type_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_bert_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evil_custom"
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(InvalidInput, match="trust_remote_code"):
        load_source(folder, tmp_path / "work")


def test_hf_checkpoint_archive_loads(tiny_bert_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "ckpt.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tiny_bert_dir, arcname="my-model")
    loaded = load_source(archive, tmp_path / "work")
    assert loaded.artifact.kind == "torch"
    assert loaded.artifact.family == "transformer"
    assert loaded.description["model_type"] == "bert"
    assert loaded.description["archive"] == "ckpt.tar.gz"
    assert loaded.artifact.meta["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert loaded.tokenizer_dir is not None
    # recorded for passes that need the PyTorch weights after export
    assert (Path(loaded.artifact.meta["source_dir"]) / "model.safetensors").is_file()
    # eager attention, as required for ORT's attention fusion
    assert loaded.artifact.torch_model.config._attn_implementation == "eager"


def test_unsupported_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.txt"
    path.write_text("hello")
    with pytest.raises(InvalidInput, match="unsupported model format"):
        load_source(path, tmp_path / "work")


# -- archives (the extractor itself is tested in tests/serving/test_archive.py) -------------
def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_archive_with_traversal_refused_and_nothing_left(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"ok.txt": b"x", "../../escape.txt": b"y"})
    with pytest.raises(InvalidInput, match=r"outside the archive"):
        load_source(archive, tmp_path / "work")
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "work" / "extracted").exists()  # removed on error


def test_archive_with_symlink_refused(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("model/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(InvalidInput, match="link"):
        load_source(archive, tmp_path / "work")
    assert not os.path.lexists(tmp_path / "work" / "extracted" / "model" / "link")


def test_corrupt_archive_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InvalidInput, match="zip"):
        load_source(bad, tmp_path / "work")
