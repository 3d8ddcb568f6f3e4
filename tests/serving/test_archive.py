"""Safe extraction of uploaded archives: traversal, links, devices, bombs, pickles, ONNX data."""

from __future__ import annotations

import io
import pickle
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from serving.archive import (
    ArchiveLimits,
    check_onnx_external_data,
    extract_archive,
    inspect_model_folder,
)
from serving.errors import InvalidInput, PayloadTooLarge
from tests.models import external_data_model


class MarkerPayload:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info in members:
            payload = data.get(info.name)
            archive.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def file_info(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


def onnx_with_external_data(folder: Path, location: str = "weights.bin") -> Path:
    """``y = x @ W`` with ``W`` stored in ``location`` beside the model."""
    folder.mkdir(parents=True, exist_ok=True)
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [x], [y], [weight]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, location=location, size_threshold=0
    )
    return path


def onnx_pointing_at(folder: Path, location: str) -> Path:
    """An ONNX file whose one tensor claims to live at ``location`` (no data written)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(external_data_model(location))
    return path


# -- traversal, links, devices --------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["../evil.txt", "a/../../evil.txt", "/tmp/evil.txt", "a\\..\\evil"]
)
def test_zip_member_outside_the_folder_is_refused(tmp_path: Path, name: str) -> None:
    archive = make_zip(tmp_path / "a.zip", {"ok.txt": b"fine", name: b"pwned"})
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(InvalidInput, match="evil"):
        extract_archive(archive, dest)
    assert not dest.exists(), "a refused archive leaves nothing half-extracted"
    assert not list(tmp_path.rglob("evil.txt"))
    assert not Path("/tmp/evil.txt").exists()


def test_tar_absolute_and_dotdot_members_are_refused(tmp_path: Path) -> None:
    for name in ("/etc/evil.txt", "../evil.txt"):
        archive = make_tar(tmp_path / "a.tar.gz", [file_info(name, b"x")], {name: b"x"})
        with pytest.raises(InvalidInput, match="evil"):
            extract_archive(archive, tmp_path / "dest")
        assert not (tmp_path / "dest").exists()
    assert not list(tmp_path.rglob("evil.txt"))


def test_tar_symlink_out_is_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("model/config.json")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    archive = make_tar(tmp_path / "a.tar.gz", [link], {})
    with pytest.raises(InvalidInput, match="link"):
        extract_archive(archive, tmp_path / "dest")


def test_tar_hardlink_is_refused(tmp_path: Path) -> None:
    target = file_info("a.txt", b"data")
    link = tarfile.TarInfo("b.txt")
    link.type = tarfile.LNKTYPE
    link.linkname = "../../outside"
    archive = make_tar(tmp_path / "a.tar", [target, link], {"a.txt": b"data"})
    with pytest.raises(InvalidInput, match="link"):
        extract_archive(archive, tmp_path / "dest")


def test_tar_device_file_is_refused(tmp_path: Path) -> None:
    device = tarfile.TarInfo("dev/null")
    device.type = tarfile.CHRTYPE
    device.devmajor, device.devminor = 1, 3
    archive = make_tar(tmp_path / "a.tar.gz", [device], {})
    with pytest.raises(InvalidInput, match="device"):
        extract_archive(archive, tmp_path / "dest")


def test_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo("model/weights.bin")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(InvalidInput, match="symlink"):
        extract_archive(path, tmp_path / "dest")


def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    path.write_bytes(b"this is not an archive at all")
    with pytest.raises(InvalidInput, match="neither a zip nor a tar"):
        extract_archive(path, tmp_path / "dest")


# -- limits -------------------------------------------------------------------------------
def test_member_count_limit_names_the_limit(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", {f"f{i}.txt": b"x" for i in range(20)})
    with pytest.raises(PayloadTooLarge, match="more than 10 members"):
        extract_archive(archive, tmp_path / "dest", limits=ArchiveLimits(max_members=10))
    assert not (tmp_path / "dest").exists()


def test_zip_bomb_is_stopped_at_the_size_limit(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(20 << 20)})
    assert archive.stat().st_size < 100_000, "highly compressible: a small upload"
    with pytest.raises(PayloadTooLarge, match=f"more than {1 << 20} bytes"):
        extract_archive(archive, tmp_path / "dest", limits=ArchiveLimits(max_total_bytes=1 << 20))
    assert not (tmp_path / "dest").exists()


def test_tar_size_limit(tmp_path: Path) -> None:
    data = bytes(3 << 20)
    archive = make_tar(tmp_path / "a.tar.gz", [file_info("big.bin", data)], {"big.bin": data})
    with pytest.raises(PayloadTooLarge, match="4x SLIMSERVE_MAX_UPLOAD_BYTES"):
        extract_archive(archive, tmp_path / "dest", limits=ArchiveLimits(max_total_bytes=1 << 20))


# -- what the folder holds ----------------------------------------------------------------
def test_pickle_checkpoint_is_refused_and_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(MarkerPayload(marker))
    archive = make_zip(
        tmp_path / "hf.zip",
        {"bert/config.json": b'{"model_type": "bert"}', "bert/pytorch_model.bin": payload},
    )
    folder = extract_archive(archive, tmp_path / "dest")
    with pytest.raises(InvalidInput, match=r"pytorch_model\.bin.*pickle"):
        inspect_model_folder(folder)
    assert not marker.exists()
    # the payload really is armed: loading it would have created the marker
    pickle.loads(payload)
    assert marker.exists()


def test_pickle_beside_safetensors_is_dropped(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "hf.zip",
        {
            "my-model/config.json": b"{}",
            "my-model/model.safetensors": b"x",
            "my-model/pytorch_model.bin": b"\x80\x04pickle",
        },
    )
    source = inspect_model_folder(extract_archive(archive, tmp_path / "dest"))
    assert source.kind == "hf"
    assert source.path.name == "my-model"
    assert not (source.path / "pytorch_model.bin").exists()
    assert (source.path / "model.safetensors").exists()


def test_onnx_with_external_data_in_an_archive(tmp_path: Path) -> None:
    model = onnx_with_external_data(tmp_path / "src")
    archive = make_zip(
        tmp_path / "m.zip",
        {
            "m/model.onnx": model.read_bytes(),
            "m/weights.bin": (model.parent / "weights.bin").read_bytes(),
        },
    )
    source = inspect_model_folder(extract_archive(archive, tmp_path / "dest"))
    assert source.kind == "onnx"
    assert source.path.name == "model.onnx"
    assert (source.path.parent / "weights.bin").is_file(), "external data is not a pickle"
    loaded = onnx.load(str(source.path))
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), np.eye(4))


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_onnx_external_data_outside_the_folder_is_refused(tmp_path: Path, location: str) -> None:
    (tmp_path / "secret.bin").write_bytes(bytes(64))
    model = onnx_pointing_at(tmp_path / "m", location)
    with pytest.raises(InvalidInput, match="outside its folder"):
        check_onnx_external_data(model)


def test_onnx_external_data_missing_or_symlinked_is_refused(tmp_path: Path) -> None:
    model = onnx_pointing_at(tmp_path / "m", "weights.bin")
    with pytest.raises(InvalidInput, match="not in the upload"):
        check_onnx_external_data(model)
    (tmp_path / "outside.bin").write_bytes(bytes(64))
    (tmp_path / "m" / "weights.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(InvalidInput):
        check_onnx_external_data(model)


def test_folder_without_a_model_says_what_it_found(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", {"notes/readme.txt": b"hi"})
    with pytest.raises(InvalidInput, match=r"no model.*readme\.txt"):
        inspect_model_folder(extract_archive(archive, tmp_path / "dest"))
