"""Turn the saved upload into something the pipeline may safely read.

Decides by the file name what the ``model`` part is (ONNX file, ``.pt2`` torch.export
archive, zip/tar archive of a Hugging Face folder or an ONNX model with external data),
unpacks archives safely, refuses pickles, and checks the optional calibration file.
"""

from __future__ import annotations

from pathlib import Path

from serving.archive import (
    PICKLE_SUFFIXES,
    ArchiveLimits,
    ModelSource,
    archive_kind,
    external_data_locations,
    extract_archive,
    inspect_model_folder,
)
from serving.errors import InvalidInput
from serving.jobs.pickles import check_pt2
from serving.jobs.upload import SavedFile, upload_suffix

ARCHIVES = (".zip", ".tar.gz", ".tgz", ".tar")
ACCEPTED = "an ONNX file (.onnx), a torch.export archive (.pt2), or a .zip/.tar.gz archive"


def prepare_model(saved: SavedFile, upload_dir: Path, limits: ArchiveLimits) -> ModelSource:
    """Check the uploaded model file (unpacking archives) and say what it is."""
    suffix = upload_suffix(saved.filename)
    if saved.size == 0:
        raise InvalidInput("the 'model' file part is empty")
    if suffix == ".onnx":
        locations = external_data_locations(saved.path)
        if locations:
            raise InvalidInput(
                f"'{saved.filename}' keeps tensors in external data ({locations[0]!r}); send the "
                "model and its data files together as a .zip or .tar.gz"
            )
        return ModelSource("onnx", saved.path)
    if suffix == ".pt2":
        if archive_kind(saved.path) != "zip":
            raise InvalidInput(f"'{saved.filename}' is not a torch.export archive (.pt2 is a zip)")
        check_pt2(saved.path)
        return ModelSource("pt2", saved.path)
    if suffix in ARCHIVES:
        folder = extract_archive(saved.path, upload_dir / "extracted", limits=limits)
        source = inspect_model_folder(folder)
        if source.kind == "pt2":
            check_pt2(source.path)
        return source
    if suffix in PICKLE_SUFFIXES:
        raise InvalidInput(
            f"'{saved.filename}' is a pickle checkpoint, which can run code when loaded, so it "
            f"is refused; upload {ACCEPTED} (Hugging Face weights as model.safetensors)"
        )
    raise InvalidInput(f"cannot tell what '{saved.filename}' is; upload {ACCEPTED}")


def check_calibration(saved: SavedFile) -> Path:
    """An ``.npz`` of plain arrays (no pickled objects) or UTF-8 text, one example a line."""
    suffix = upload_suffix(saved.filename)
    if suffix == ".npz":
        import numpy as np

        try:
            with np.load(saved.path, allow_pickle=False) as data:
                for key in data.files:
                    data[key]
        except ValueError as exc:
            raise InvalidInput(
                f"calibration '{saved.filename}' holds object arrays (pickles), refused: {exc}"
            ) from None
        except Exception as exc:
            raise InvalidInput(
                f"calibration '{saved.filename}' is not a valid .npz: {exc}"
            ) from None
        return saved.path
    if suffix in PICKLE_SUFFIXES:
        raise InvalidInput(f"calibration '{saved.filename}' is a pickle; use .npz or text lines")
    try:
        text = saved.path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(
            f"calibration '{saved.filename}' is neither an .npz nor UTF-8 text (one example a line)"
        ) from None
    if not text.strip():
        raise InvalidInput(f"calibration '{saved.filename}' is empty")
    target = saved.path.with_name("calibration.txt")
    if target != saved.path:
        saved.path.rename(target)
    return target
