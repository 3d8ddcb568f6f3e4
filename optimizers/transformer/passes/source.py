"""Find the BERT-family encoder behind a pipeline artifact (helpers for the passes)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from optimizers.passes.base import Artifact, PassContext, PassNotApplicable
from optimizers.transformer.encoder import SlimEncoder
from optimizers.transformer.hf import SUPPORTED, from_hf, load_hf_encoder

FOLDER_KEYS = ("hf_dir", "source_dir", "tokenizer_dir")


def checkpoint_folder(meta: dict[str, Any]) -> Path | None:
    """The Hugging Face checkpoint folder recorded in ``meta`` (config + safetensors), if any."""
    for key in FOLDER_KEYS:
        value = meta.get(key)
        if (
            value
            and (Path(value) / "config.json").is_file()
            and (Path(value) / "model.safetensors").is_file()
        ):
            return Path(value)
    return None


def check_applicable(artifact: Artifact, name: str) -> None:
    """Raise ``PassNotApplicable`` unless ``artifact`` is a supported BERT-family encoder."""
    if artifact.family != "transformer":
        raise PassNotApplicable(f"{name} applies to transformer encoders, not {artifact.family}")
    if isinstance(artifact.torch_model, SlimEncoder):
        return
    model_type = artifact.meta.get("model_type")
    if model_type not in SUPPORTED:
        raise PassNotApplicable(
            f"{name} supports {', '.join(SUPPORTED)} encoders, not {model_type!r}"
        )
    if artifact.torch_model is None and checkpoint_folder(artifact.meta) is None:
        raise PassNotApplicable(
            f"{name} needs the Hugging Face checkpoint the ONNX came from (none recorded)"
        )


def source_encoder(artifact: Artifact) -> SlimEncoder:
    """A ``SlimEncoder`` for ``artifact`` (a fresh copy; the artifact is not changed)."""
    model = artifact.torch_model
    if isinstance(model, SlimEncoder):
        return copy.deepcopy(model)
    if model is not None:
        return from_hf(model)
    folder = checkpoint_folder(artifact.meta)
    if folder is None:
        raise PassNotApplicable("no Hugging Face checkpoint recorded for this model")
    return from_hf(load_hf_encoder(folder))


def original_encoder(artifact: Artifact) -> SlimEncoder:
    """The unpruned encoder (the reference for fidelity), from the recorded checkpoint."""
    folder = checkpoint_folder(artifact.meta)
    if folder is not None:
        return from_hf(load_hf_encoder(folder))
    return source_encoder(artifact)


def calibration_batches(ctx: PassContext, name: str) -> list[dict]:
    """Calibration batches with token ids and an attention mask."""
    batches = [
        b
        for b in (ctx.calibration.get("inputs") or [])
        if "input_ids" in b and "attention_mask" in b
    ]
    if not batches:
        raise PassNotApplicable(f"{name} needs calibration batches with input_ids/attention_mask")
    return batches


def output_name(artifact: Artifact) -> str:
    names = artifact.meta.get("output_names") or ["last_hidden_state"]
    return str(names[0])
