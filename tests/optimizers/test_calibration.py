"""Calibration data: .npz / text lines / built-in pydoc text / synthetic, split and batched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimizers.calibration import (
    PRUNING_EXAMPLES,
    load_calibration,
    pruning_texts,
    pydoc_sentences,
    synthetic_feeds,
)
from optimizers.fidelity import within_bound
from optimizers.onnxutil import IOSpec
from serving.errors import InvalidInput

TOKEN_SPECS = [
    IOSpec("input_ids", np.int64, ("batch", "sequence")),
    IOSpec("attention_mask", np.int64, ("batch", "sequence")),
    IOSpec("token_type_ids", np.int64, ("batch", "sequence")),
]
IMAGE_SPECS = [IOSpec("image", np.float32, ("N", 3, 16, 16))]


def test_pydoc_sentences_are_real_deterministic_text() -> None:
    sentences = pydoc_sentences()
    assert len(sentences) > 1000
    assert sentences == pydoc_sentences()
    assert len(set(sentences)) == len(sentences)
    for sentence in sentences[:200]:
        assert 6 <= len(sentence.split()) <= 60
        assert "::=" not in sentence


def test_builtin_text_for_tokenizer_models(tiny_bert_dir: Path) -> None:
    data = load_calibration(
        None,
        TOKEN_SPECS,
        family="transformer",
        meta={},
        tokenizer_dir=tiny_bert_dir,
        batch_size=8,
        seq_len=32,
        examples=16,
    )
    assert data["synthetic"] is True
    assert "pydoc_data.topics" in data["source"]
    assert data["examples"] == {"calibration": 16, "eval": 16}
    calib_texts, eval_texts = data["texts"][:16], data["texts"][16:]
    assert not set(calib_texts) & set(eval_texts)  # held-out really held out
    batch = data["eval"][0]
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert batch["input_ids"].shape[0] == 8
    assert batch["input_ids"].shape[1] <= 32
    # more built-in text for weight-fitting passes, none of it from the held-out half
    pruning = data["pruning_inputs"]
    assert sum(len(b["input_ids"]) for b in pruning) == PRUNING_EXAMPLES
    assert set(pruning[0]) == set(batch)
    # the tiny tokenizer maps most words to [UNK], so the texts are checked, not the ids
    chosen = pruning_texts(pydoc_sentences(), eval_texts, PRUNING_EXAMPLES)
    assert len(set(chosen)) == PRUNING_EXAMPLES
    assert not set(chosen) & set(eval_texts)
    assert set(chosen) & set(calib_texts)


def test_npz_with_labels_split_in_halves(tmp_path: Path) -> None:
    images = np.random.default_rng(0).standard_normal((10, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", image=images, labels=np.arange(10))
    data = load_calibration(
        tmp_path / "c.npz",
        IMAGE_SPECS,
        family="cnn",
        meta={},
        tokenizer_dir=None,
        batch_size=4,
        seq_len=128,
    )
    assert data["synthetic"] is False
    assert [b["image"].shape[0] for b in data["inputs"]] == [4, 1]
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in data["eval"]]), images[5:])
    np.testing.assert_array_equal(np.concatenate(data["eval_labels"]), np.arange(5, 10))


def test_npz_missing_input_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", pixels=np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(InvalidInput, match="missing input 'image'"):
        load_calibration(
            tmp_path / "c.npz",
            IMAGE_SPECS,
            family="cnn",
            meta={},
            tokenizer_dir=None,
            batch_size=4,
            seq_len=128,
        )


def test_npz_object_arrays_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InvalidInput, match="object arrays"):
        load_calibration(
            tmp_path / "c.npz",
            IMAGE_SPECS,
            family="cnn",
            meta={},
            tokenizer_dir=None,
            batch_size=4,
            seq_len=128,
        )


def test_text_file_with_labels(tiny_bert_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("the value is a list\t1\nreturn the name of it\t0\n\nthis is data\t1\n")
    data = load_calibration(
        path,
        TOKEN_SPECS,
        family="transformer",
        meta={},
        tokenizer_dir=tiny_bert_dir,
        batch_size=8,
        seq_len=32,
    )
    assert data["texts"] == ["the value is a list", "return the name of it", "this is data"]
    np.testing.assert_array_equal(np.concatenate(data["eval_labels"]), [0, 1])


def test_text_file_needs_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(InvalidInput, match="tokenizer"):
        load_calibration(
            path,
            IMAGE_SPECS,
            family="cnn",
            meta={},
            tokenizer_dir=None,
            batch_size=4,
            seq_len=128,
        )


def test_synthetic_feeds_shapes_and_masks() -> None:
    feeds = synthetic_feeds(TOKEN_SPECS, 6, 20, "transformer", {"vocab_size": 50}, seed=3)
    assert feeds["input_ids"].shape == (6, 20)
    assert feeds["input_ids"].max() < 50
    lengths = feeds["attention_mask"].sum(1)
    assert lengths.min() >= 5
    assert (feeds["attention_mask"][:, 0] == 1).all()
    images = synthetic_feeds(IMAGE_SPECS, 2, 128, "cnn", {})
    assert images["image"].shape == (2, 3, 16, 16)


def test_within_bound() -> None:
    assert within_bound({"cosine": 0.995}, {"min_cosine": 0.99})[0]
    ok, why = within_bound({"cosine": 0.9}, {"min_cosine": 0.99})
    assert not ok
    assert "min_cosine" in why
    ok, why = within_bound({"cosine": 1.0, "accuracy_drop": 0.02}, {"max_accuracy_drop": 0.01})
    assert not ok
    assert "accuracy drop" in why
    assert not within_bound({"cosine": 1.0}, {"max_accuracy_drop": 0.01})[0]
    assert not within_bound({"cosine": float("nan")}, {"min_cosine": 0.5})[0]
