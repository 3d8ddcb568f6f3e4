"""Load what a user uploaded into an ``Artifact``: ONNX, Hugging Face checkpoint, ``.pt2``.

Pickle-based checkpoints (``pytorch_model.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.ckpt``) are
refused: unpickling an untrusted file runs arbitrary code. Hugging Face checkpoints load
offline, from ``model.safetensors``, with the library's own class for ``model_type`` (never
``trust_remote_code``) and eager attention (SDPA defeats ONNX Runtime's attention fusion).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optimizers.onnxutil import graph_io, load_model, op_counts, save_model
from optimizers.passes.base import Artifact
from optimizers.pickle_scan import check_pt2
from serving.archive import ARCHIVE_SUFFIXES, extract_archive, single_root
from serving.errors import InvalidInput
from serving.fileutil import confined

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


@dataclass
class LoadedSource:
    """The uploaded model as an artifact, plus what the report says about it."""

    artifact: Artifact
    description: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: Path | None = None


def load_source(source: Path, workdir: Path) -> LoadedSource:
    """Detect the format of ``source`` (file, folder or archive) and load it."""
    if not source.exists():
        raise InvalidInput(f"model source {source.name!r} does not exist")
    # Judged by name, not content: a .pt2 program is itself a zip file.
    if source.is_file() and source.name.lower().endswith(ARCHIVE_SUFFIXES):
        folder = single_root(extract_archive(source, workdir / "extracted"))
        loaded = load_source(folder, workdir)
        loaded.description["archive"] = source.name
        return loaded
    if source.is_dir():
        return _load_folder(source, workdir)
    suffix = source.suffix.lower()
    if suffix == ".onnx":
        return load_onnx(source, workdir)
    if suffix == ".pt2":
        return load_pt2(source)
    if suffix in PICKLE_SUFFIXES or _looks_like_pickle(source):
        raise _pickle_refused(source.name)
    raise InvalidInput(
        f"{source.name}: unsupported model format; upload an .onnx file, a Hugging Face "
        "checkpoint (folder or .zip/.tar.gz with config.json + model.safetensors), or a "
        "torch.export .pt2 archive"
    )


def _pickle_refused(name: str) -> InvalidInput:
    return InvalidInput(
        f"{name}: pickle-based checkpoints are refused (loading them can run arbitrary code); "
        "save the weights as safetensors (model.save_pretrained(..., safe_serialization=True)) "
        "or export with torch.export / to ONNX"
    )


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(2)
    return len(head) == 2 and head[0] == 0x80 and head[1] <= 5


def _load_folder(folder: Path, workdir: Path) -> LoadedSource:
    if (folder / "config.json").is_file():
        return load_hf_checkpoint(folder)
    onnx_files = sorted(folder.glob("*.onnx"))
    if len(onnx_files) == 1:
        return load_onnx(onnx_files[0], workdir)
    pt2_files = sorted(folder.glob("*.pt2"))
    if len(pt2_files) == 1:
        return load_pt2(pt2_files[0])
    pickles = [p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise _pickle_refused(pickles[0].name)
    raise InvalidInput(
        f"{folder.name}: found no model: expected config.json + model.safetensors, exactly one "
        ".onnx file, or one .pt2 archive"
    )


# -- ONNX ------------------------------------------------------------------------------
def load_onnx(path: Path, workdir: Path) -> LoadedSource:
    """Validate an ONNX file (external data confined to its folder) and copy it to the workdir."""
    import onnx

    try:
        header = load_model(path, weights=False)
    except Exception as exc:
        raise InvalidInput(f"{path.name}: not a readable ONNX model: {exc}") from exc
    for tensor in onnx.external_data_helper._get_all_tensors(header):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    location = confined(path.parent, entry.value)
                    if not location.is_file():
                        raise InvalidInput(
                            f"{path.name}: external data file {entry.value!r} is missing; "
                            "upload it beside the model (e.g. in a .zip)"
                        )
    try:
        model = load_model(path)
        onnx.checker.check_model(model, full_check=False)
    except InvalidInput:
        raise
    except Exception as exc:
        raise InvalidInput(f"{path.name}: invalid ONNX model: {exc}") from exc
    target = workdir / "source" / "model.onnx"
    save_model(model, target)
    family, meta = detect_onnx_family(target)
    artifact = Artifact("onnx", family, onnx_path=target, meta=meta)
    return LoadedSource(
        artifact, {"format": "onnx", "file": path.name, "family": family, "opset": _opset(model)}
    )


def _opset(model: Any) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def detect_onnx_family(path: Path) -> tuple[str, dict[str, Any]]:
    """``transformer`` (has ``input_ids``), ``cnn`` (Conv nodes, 4-D input) or ``generic``."""
    inputs, outputs = graph_io(path)
    names = [spec.name for spec in inputs]
    meta: dict[str, Any] = {"input_names": names, "output_names": [s.name for s in outputs]}
    if "input_ids" in names:
        meta.update(num_heads=0, hidden_size=0, ort_model_type="bert")
        return "transformer", meta
    counts = op_counts(path)
    if counts.get("Conv", 0) and any(len(spec.dims) == 4 for spec in inputs):
        return "cnn", meta
    return "generic", meta


# -- Hugging Face ----------------------------------------------------------------------
ORT_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "electra": "bert",
    "distilbert": "bert",
    "mpnet": "bert",
    "albert": "bert",
}


def load_hf_checkpoint(folder: Path) -> LoadedSource:
    """Load a transformers checkpoint folder offline with its known architecture class."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoConfig

    if not (folder / "model.safetensors").is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise _pickle_refused(pickles[0])
        raise InvalidInput(f"{folder.name}: Hugging Face checkpoint has no model.safetensors")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"config.json is not valid JSON: {exc}") from exc
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise InvalidInput(
            f"config.json: model_type {model_type!r} is not an architecture transformers knows; "
            "custom model code is never run (no trust_remote_code)"
        )
    try:
        config = AutoConfig.from_pretrained(
            str(folder), trust_remote_code=False, local_files_only=True
        )
        model_class = _architecture_class(config)
        model = model_class.from_pretrained(
            str(folder),
            config=config,
            attn_implementation="eager",
            use_safetensors=True,
            local_files_only=True,
        )
    except Exception as exc:
        raise InvalidInput(f"could not load the {model_type} checkpoint: {exc}") from exc
    model.eval()
    tokenizer_dir = folder if _has_tokenizer(folder) else None
    input_names = _input_names(model, config, tokenizer_dir)
    meta = {
        "input_names": input_names,
        "num_heads": int(getattr(config, "num_attention_heads", 0) or 0),
        "hidden_size": int(getattr(config, "hidden_size", 0) or 0),
        "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
        "model_type": model_type,
        "ort_model_type": ORT_MODEL_TYPES.get(model_type, "bert"),
        "dynamic_axes": {name: {0: "batch", 1: "sequence"} for name in input_names},
        "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir else None,
        # the checkpoint folder, for passes that need the PyTorch weights after export
        "source_dir": str(folder),
        "checkpoint_dir": str(folder),
    }
    artifact = Artifact("torch", "transformer", torch_model=model, meta=meta)
    description = {
        "format": "huggingface",
        "model_type": model_type,
        "class": model_class.__name__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "tokenizer": tokenizer_dir is not None,
        "family": "transformer",
    }
    return LoadedSource(artifact, description, tokenizer_dir)


def _architecture_class(config: Any) -> type:
    import transformers
    from transformers import AutoModel

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None and getattr(cls, "config_class", None) is type(config):
            return cls
    return AutoModel._model_mapping[type(config)]


def _has_tokenizer(folder: Path) -> bool:
    names = ("tokenizer.json", "vocab.txt", "spiece.model")
    return any((folder / name).is_file() for name in names)


def _input_names(model: Any, config: Any, tokenizer_dir: Path | None) -> list[str]:
    accepted = set(inspect.signature(model.forward).parameters)
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in accepted and int(getattr(config, "type_vocab_size", 0) or 0) > 0:
        names.append("token_type_ids")
    return [name for name in names if name in accepted]


def transformer_example(meta: dict[str, Any], batch: int, seq: int, seed: int = 0) -> dict:
    """Token inputs for export and timing: random ids, full attention mask, zero segments."""
    rng = np.random.default_rng(seed)
    vocab = max(int(meta.get("vocab_size") or 0), 2)
    feeds: dict[str, np.ndarray] = {}
    for name in meta["input_names"]:
        if name == "input_ids":
            feeds[name] = rng.integers(1, vocab, size=(batch, seq), dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, seq), dtype=np.int64)
        else:
            feeds[name] = np.zeros((batch, seq), dtype=np.int64)
    return feeds


# -- torch.export ----------------------------------------------------------------------
def load_pt2(path: Path) -> LoadedSource:
    """Load a ``torch.export`` archive (``torch.export.save``); its example inputs drive export.

    Every pickle inside is scanned first (``optimizers.pickle_scan.check_pt2``) and the archive
    refused if one names a global beyond plain tensors: ``torch.export.load`` would run it.
    """
    check_pt2(path)
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise InvalidInput(f"{path.name}: not a loadable torch.export archive: {exc}") from exc
    example = getattr(program, "example_inputs", None)
    if not example or not example[0]:
        raise InvalidInput(
            f"{path.name}: the torch.export archive carries no example inputs; export it with "
            "torch.export.export(model, example_args) and save with torch.export.save"
        )
    args = example[0]
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise InvalidInput(f"{path.name}: only tensor positional inputs are supported")
    names = [spec.arg.name for spec in program.graph_signature.input_specs if _is_user(spec)]
    names = names[: len(args)] or [f"input_{i}" for i in range(len(args))]
    feeds = {name: arg.detach().cpu().numpy() for name, arg in zip(names, args, strict=False)}
    family = "generic"
    if "input_ids" in names:
        family = "transformer"
    elif any(a.dim() == 4 and a.is_floating_point() for a in args):
        family = "cnn"
    meta = {"input_names": names, "example_inputs": feeds, "exported_program": True}
    artifact = Artifact("torch", family, torch_model=program, meta=meta)
    return LoadedSource(artifact, {"format": "torch.export", "file": path.name, "family": family})


def _is_user(spec: Any) -> bool:
    from torch.export.graph_signature import InputKind

    return spec.kind == InputKind.USER_INPUT


def copy_tokenizer(tokenizer_dir: Path | None, dest: Path) -> None:
    """Copy tokenizer files (small) so the result stays usable after the upload is gone."""
    if tokenizer_dir is None:
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, dest / name)
