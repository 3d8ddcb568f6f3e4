"""ModelRepository: scanning, version policies, broken entries, atomic publish, confinement."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from serving import fileutil
from serving.errors import InvalidInput, ModelNotFound, RepositoryError
from serving.model_config import parse_config, read_config
from serving.repository import TEMP_PREFIX, ModelRepository, apply_version_policy

PROJECT = Path(__file__).resolve().parents[2]
DEMO = PROJECT / "model_repository"
WINE_ONNX = DEMO / "wine_mlp" / "1" / "model.onnx"  # 3 KiB, real ONNX


def _model(root: Path, name: str, versions: list[int], config: str | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for number in versions:
        (folder / str(number)).mkdir()
        shutil.copyfile(WINE_ONNX, folder / str(number) / "model.onnx")
    if config is not None:
        (folder / "config.pbtxt").write_text(config)
    return folder


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    root = tmp_path / "repo"
    root.mkdir()
    return ModelRepository(root)


# -- reading -----------------------------------------------------------------------------


def test_shipped_demo_repository_scans_clean() -> None:
    entries = ModelRepository(DEMO).scan()
    assert {"digits_cnn", "wine_mlp"} <= set(entries)
    for entry in entries.values():
        assert entry.ok, entry.error
        assert entry.versions
        assert entry.config.platform == "onnxruntime_onnx"
    assert entries["digits_cnn"].config.max_batch_size == 64


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        ModelRepository(tmp_path / "nope")


def test_model_without_config_is_autocompleted(repo: ModelRepository) -> None:
    _model(repo.root, "wine", [1])
    entry = repo.entry("wine")
    assert entry.ok, entry.error
    assert entry.config.name == "wine"
    assert entry.config.platform == "onnxruntime_onnx"
    assert entry.config.max_batch_size > 0
    assert [t.name for t in entry.config.output] == ["probabilities", "class_id", "label"]
    assert entry.config.output[2].data_type == mc.TYPE_STRING


def test_only_plain_positive_numeric_folders_are_versions(repo: ModelRepository) -> None:
    folder = _model(repo.root, "wine", [1, 2, 10])
    for odd in ("0", "01", "v3", ".4", "-5"):
        (folder / odd).mkdir()
    (folder / "7").write_text("a file, not a folder")
    assert repo.version_numbers("wine") == [1, 2, 10]
    assert [v.version for v in repo.entry("wine").versions] == [10]  # default: latest 1


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("", [5]),
        ("version_policy: { latest: { num_versions: 2 } }", [3, 5]),
        ("version_policy: { latest: { num_versions: 9 } }", [1, 2, 3, 5]),
        ("version_policy: { all: {} }", [1, 2, 3, 5]),
        ("version_policy: { specific: { versions: [ 1, 3, 4 ] } }", [1, 3]),
    ],
)
def test_version_policy(repo: ModelRepository, policy: str, expected: list[int]) -> None:
    _model(repo.root, "wine", [1, 2, 3, 5], config=policy)
    entry = repo.entry("wine")
    assert entry.ok, entry.error
    assert [v.version for v in entry.versions] == expected
    assert entry.all_versions == [1, 2, 3, 5]
    assert entry.version(expected[0]).model_file.name == "model.onnx"


def test_version_policy_pure_function() -> None:
    config = parse_config("version_policy: { latest: { num_versions: 0 } }")
    assert apply_version_policy(config, [3, 1, 2]) == [3]
    config = parse_config("version_policy: { specific: { versions: [ 2 ] } }")
    assert apply_version_policy(config, [3, 1, 2]) == [2]


def test_unselected_version_is_not_found(repo: ModelRepository) -> None:
    _model(repo.root, "wine", [1, 2])
    with pytest.raises(ModelNotFound, match=r"no servable version 1 \(servable: \[2\]\)"):
        repo.entry("wine").version(1)


def test_specific_policy_selecting_nothing_is_broken(repo: ModelRepository) -> None:
    _model(repo.root, "wine", [1, 2], config="version_policy: { specific: { versions: [ 7 ] } }")
    entry = repo.entry("wine")
    assert not entry.ok
    assert "selects none of [1, 2]" in entry.error


def test_broken_entries_carry_reasons_while_others_scan(repo: ModelRepository) -> None:
    root = repo.root
    _model(root, "good", [1])
    corrupt = _model(root, "corrupt_onnx", [1])
    (corrupt / "1" / "model.onnx").write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10)
    _model(root, "bad_pbtxt", [1], config='name: "bad_pbtxt"\nmax_batch_size: [oops\n')
    _model(root, "no_versions", [])
    _model(root, "wrong_name", [1], config='name: "someone_else"')
    empty_version = _model(root, "empty_version", [])
    (empty_version / "1").mkdir()
    _model(root, "missing_selected", [1, 2], config="version_policy: { all: {} }")
    (root / "missing_selected" / "1" / "model.onnx").unlink()
    _model(root, "plan_without_file", [1], config='platform: "tensorrt_plan"')
    (root / "not_a_model.txt").write_text("files at the top level are ignored")
    (root / ".hidden").mkdir()

    entries = repo.scan()
    assert set(entries) == {
        "good",
        "corrupt_onnx",
        "bad_pbtxt",
        "no_versions",
        "wrong_name",
        "empty_version",
        "missing_selected",
        "plan_without_file",
    }
    assert entries["good"].ok
    assert [v.version for v in entries["good"].versions] == [1]
    reasons = {name: entry.error for name, entry in entries.items() if not entry.ok}
    assert set(reasons) == set(entries) - {"good"}
    assert reasons["bad_pbtxt"].startswith(str(root / "bad_pbtxt" / "config.pbtxt"))
    assert "no numeric version folder" in reasons["no_versions"]
    assert "'someone_else'" in reasons["wrong_name"]
    assert "folder is 'wrong_name'" in reasons["wrong_name"]
    assert "no version folder holds 'model.onnx'" in reasons["empty_version"]
    assert "version 1: 'model.onnx' is missing" in reasons["missing_selected"]
    assert "'model.plan'" in reasons["plan_without_file"]
    for name, entry in entries.items():
        if name != "good":
            assert entry.versions == []


def test_corrupt_onnx_reason_names_the_failure(repo: ModelRepository) -> None:
    corrupt = _model(repo.root, "corrupt", [1])
    (corrupt / "1" / "model.onnx").write_bytes(b"garbage" * 100)
    entry = repo.entry("corrupt")
    assert not entry.ok
    assert "Error parsing message" in entry.error


def test_unknown_model_is_not_found(repo: ModelRepository) -> None:
    with pytest.raises(ModelNotFound, match="'ghost' is not in the repository"):
        repo.entry("ghost")


# -- confinement -------------------------------------------------------------------------

BAD_NAMES = ["../escape", "..", ".", "a/b", "/etc", "/tmp/x", "..\\x", ".hidden", "", "a" * 129]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_model_names_are_refused(repo: ModelRepository, name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid model name"):
        repo.model_dir(name)
    with pytest.raises(InvalidInput):
        repo.entry(name)
    with pytest.raises(InvalidInput):
        repo.publish_version(name, {"model.onnx": b"x"})
    assert list(repo.root.parent.iterdir()) == [repo.root]  # nothing written beside the root


def test_good_model_names_pass() -> None:
    for name in ("digits_cnn", "bert-base.int8", "A1", "x" * 128):
        assert fileutil.validate_model_name(name) == name


def test_confined_refuses_escapes(tmp_path: Path) -> None:
    assert fileutil.confined(tmp_path, "a", "b") == tmp_path.resolve() / "a" / "b"
    assert fileutil.confined(tmp_path) == tmp_path.resolve()
    for parts in (("..",), ("a", "..", ".."), ("/etc/passwd",), ("a/../../b",)):
        with pytest.raises(InvalidInput, match="escapes"):
            fileutil.confined(tmp_path, *parts)


def test_symlinked_version_folder_pointing_outside_is_refused(
    repo: ModelRepository, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(WINE_ONNX, outside / "model.onnx")
    folder = _model(repo.root, "wine", [1])
    (folder / "2").symlink_to(outside, target_is_directory=True)
    entry = repo.entry("wine")
    assert not entry.ok
    assert "escapes" in entry.error
    assert all(outside not in v.model_file.parents for v in entry.versions)


def test_symlinked_model_file_pointing_outside_is_refused(
    repo: ModelRepository, tmp_path: Path
) -> None:
    shutil.copyfile(WINE_ONNX, tmp_path / "elsewhere.onnx")
    folder = _model(repo.root, "wine", [])
    (folder / "1").mkdir()
    (folder / "1" / "model.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    entry = repo.entry("wine")
    assert not entry.ok
    assert "escapes" in entry.error


def test_symlinked_model_folder_and_bad_folder_names_do_not_break_scan(
    repo: ModelRepository, tmp_path: Path
) -> None:
    outside = _model(tmp_path, "outside_model", [1])
    (repo.root / "linked").symlink_to(outside, target_is_directory=True)
    (repo.root / "has space").mkdir()
    _model(repo.root, "good", [1])
    entries = repo.scan()
    assert entries["good"].ok
    assert "escapes" in entries["linked"].error
    assert "invalid model name" in entries["has space"].error
    assert repo.clean_stale_temp() == []


def test_symlink_inside_the_repository_is_allowed(repo: ModelRepository) -> None:
    folder = _model(repo.root, "wine", [1])
    (folder / "2").symlink_to(folder / "1", target_is_directory=True)
    entry = repo.entry("wine")
    assert entry.ok, entry.error
    assert [v.version for v in entry.versions] == [2]


# -- publishing --------------------------------------------------------------------------


def test_publish_new_model_and_next_versions(repo: ModelRepository, tmp_path: Path) -> None:
    config = parse_config("max_batch_size: 4\nversion_policy: { all: {} }")
    assert repo.next_version("wine") == 1
    number = repo.publish_version(
        "wine",
        {"model.onnx": WINE_ONNX, "report.json": b'{"how": "test"}', "extra/notes.txt": b"n"},
        config=config,
    )
    assert number == 1
    folder = repo.root / "wine" / "1"
    assert (folder / "model.onnx").read_bytes() == WINE_ONNX.read_bytes()
    assert (folder / "report.json").read_bytes() == b'{"how": "test"}'
    assert (folder / "extra" / "notes.txt").read_bytes() == b"n"
    written = read_config(repo.root / "wine")
    assert written.name == "wine"
    assert written.max_batch_size == 4
    assert repo.next_version("wine") == 2
    assert repo.publish_version("wine", {"model.onnx": WINE_ONNX.read_bytes()}) == 2
    assert repo.publish_version("wine", {"model.onnx": WINE_ONNX}, version=7) == 7
    assert repo.next_version("wine") == 8
    entry = repo.entry("wine")
    assert entry.ok, entry.error
    assert [v.version for v in entry.versions] == [1, 2, 7]
    assert not [p for p in (repo.root / "wine").iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_publish_refuses_existing_or_nonpositive_versions(repo: ModelRepository) -> None:
    repo.publish_version("wine", {"model.onnx": WINE_ONNX})
    with pytest.raises(InvalidInput, match="already has version 1"):
        repo.publish_version("wine", {"model.onnx": WINE_ONNX}, version=1)
    with pytest.raises(InvalidInput, match="positive integer"):
        repo.publish_version("wine", {"model.onnx": WINE_ONNX}, version=0)


@pytest.mark.parametrize("relative", ["../evil.onnx", "../../evil.onnx", "/tmp/evil.onnx"])
def test_publish_refuses_files_escaping_the_version(repo: ModelRepository, relative: str) -> None:
    with pytest.raises(InvalidInput, match="escapes"):
        repo.publish_version("wine", {"model.onnx": b"ok", relative: b"evil"})
    assert sorted(p.name for p in (repo.root / "wine").iterdir()) == []
    assert not list(repo.root.parent.rglob("evil.onnx"))


def test_failed_copy_mid_publish_leaves_no_version(
    repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo.publish_version("wine", {"model.onnx": WINE_ONNX})

    def half_copy(source: Path, target: Path) -> None:
        Path(target).write_bytes(Path(source).read_bytes()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", half_copy)
    with pytest.raises(OSError, match="No space left"):
        repo.publish_version("wine", {"report.json": b"{}", "model.onnx": WINE_ONNX})
    assert sorted(p.name for p in (repo.root / "wine").iterdir()) == ["1"]
    assert repo.version_numbers("wine") == [1]
    assert repo.next_version("wine") == 2


def test_killed_publish_leaves_only_a_stale_temp_that_is_cleaned(repo: ModelRepository) -> None:
    script = textwrap.dedent(
        f"""
        import os, shutil
        from pathlib import Path
        from serving.repository import ModelRepository

        def die_mid_copy(source, target):
            Path(target).write_bytes(Path(source).read_bytes()[:64])
            os._exit(9)  # the process dies: no except/finally runs

        shutil.copyfile = die_mid_copy
        ModelRepository({str(repo.root)!r}).publish_version(
            "wine", {{"model.onnx": Path({str(WINE_ONNX)!r})}}
        )
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 9, done.stderr.decode()
    leftovers = list((repo.root / "wine").iterdir())
    assert len(leftovers) == 1
    assert leftovers[0].name.startswith(TEMP_PREFIX)
    # the half-written folder is invisible: not a model, not a version
    assert repo.version_numbers("wine") == []
    assert "no numeric version folder" in repo.scan()["wine"].error
    assert repo.clean_stale_temp() == leftovers
    assert list((repo.root / "wine").iterdir()) == []
    assert repo.publish_version("wine", {"model.onnx": WINE_ONNX}) == 1
    assert repo.entry("wine").ok


def test_write_model_config_sets_the_name(repo: ModelRepository) -> None:
    repo.publish_version("wine", {"model.onnx": WINE_ONNX})
    repo.write_model_config("wine", parse_config('name: "other"\nmax_batch_size: 2'))
    assert read_config(repo.root / "wine").name == "wine"
    assert repo.entry("wine").config.max_batch_size == 2


def test_atomic_write_keeps_old_content_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "config.pbtxt"
    fileutil.atomic_write_text(target, "old")

    def fail_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="I/O error"):
        fileutil.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.pbtxt"]


# -- the shipped demo models ---------------------------------------------------------------------


@pytest.mark.slow
def test_demo_models_regenerate_like_the_shipped_ones(tmp_path: Path) -> None:
    """bench/train_demo_models.py trains, checks and writes what model_repository/ ships."""
    done = subprocess.run(
        [
            sys.executable,
            str(PROJECT / "bench" / "train_demo_models.py"),
            "--repository",
            str(tmp_path / "repo"),
            "--data",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    accuracy = {
        name: float(value)
        for name, value in re.findall(r"^(\w+): test accuracy ([\d.]+)", done.stdout, re.M)
    }
    assert accuracy["digits_cnn"] >= 0.97
    assert accuracy["wine_mlp"] >= 0.9
    for name in ("digits_cnn", "wine_mlp"):
        # configs come from code, not numerics: byte-identical
        shipped = (DEMO / name / "config.pbtxt").read_text()
        assert (tmp_path / "repo" / name / "config.pbtxt").read_text() == shipped
        model = tmp_path / "repo" / name / "1" / "model.onnx"
        assert model.stat().st_size < 1024 * 1024
        fresh, ours = onnx.load(str(model)), onnx.load(str(DEMO / name / "1" / "model.onnx"))
        assert [i.name for i in fresh.graph.input] == [i.name for i in ours.graph.input]
        assert [o.name for o in fresh.graph.output] == [o.name for o in ours.graph.output]
    for split in ("digits_test.npz", "wine_test.npz"):
        fresh, shipped = (
            np.load(tmp_path / "data" / split),
            np.load(PROJECT / "bench" / "data" / split),
        )
        np.testing.assert_array_equal(fresh["x"], shipped["x"])
        np.testing.assert_array_equal(fresh["y"], shipped["y"])
    entries = ModelRepository(tmp_path / "repo").scan()
    assert all(entry.ok for entry in entries.values())


def test_importing_the_repository_pulls_in_neither_fastapi_nor_torch() -> None:
    code = (
        "import sys, serving.repository, serving.model_config, serving.fileutil\n"
        "heavy = sorted(m for m in ('fastapi', 'starlette', 'torch', 'onnxruntime') "
        "if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == ""
