"""Calibration and evaluation data: user ``.npz`` / text lines, built-in text, or synthetic.

The data is split into a calibration half (static quantization ranges, sensitivity search)
and a held-out half (fidelity). Without user data a model with a tokenizer gets real English
sentences from the documentation that ships with CPython (``pydoc_data.topics``); other
models get synthetic inputs, and the report says so.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optimizers.onnxutil import IOSpec
from serving.errors import InvalidInput

DEFAULT_EXAMPLES = 64
PRUNING_EXAMPLES = 512
"""Built-in sentences given to passes that fit weights to the data (structured pruning's
OBS step wants a few hundred; the 64 of the calibration half are too few)."""
DEFAULT_IMAGE_SIDE = 224
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def pydoc_sentences(min_words: int = 6, max_words: int = 60) -> list[str]:
    """English sentences from CPython's bundled documentation, deterministic order."""
    from pydoc_data import topics

    sentences: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics.topics):
        for paragraph in topics.topics[key].split("\n\n"):
            text = " ".join(paragraph.split())
            if not text or text.startswith((">>>", "...", "*", "+", "|", "=")):
                continue
            for sentence in _SENTENCE_END.split(text):
                words = sentence.split()
                if not min_words <= len(words) <= max_words:
                    continue
                letters = sum(c.isalpha() for c in sentence)
                if letters < 0.6 * len(sentence) or "::=" in sentence or sentence in seen:
                    continue
                seen.add(sentence)
                sentences.append(sentence)
    return sentences


def split_texts(texts: Sequence[str], n_calibration: int, n_eval: int) -> tuple[list, list]:
    """Disjoint calibration and held-out slices, spread over the whole list."""
    texts = list(texts)
    picked = texts[:: max(1, len(texts) // max(1, n_calibration + n_eval))]
    return picked[0::2][:n_calibration], picked[1::2][:n_eval]


def pruning_texts(texts: Sequence[str], held_out: Sequence[str], n: int) -> list[str]:
    """Up to ``n`` of ``texts`` spread over the list, none of them in ``held_out``."""
    excluded = set(held_out)
    pool = [t for t in texts if t not in excluded]
    return pool[:: max(1, len(pool) // max(1, n))][:n]


def tokenize(
    tokenizer_dir: Path, texts: Sequence[str], seq_len: int, input_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Tokenize ``texts`` (padded to the longest, truncated to ``seq_len``) as int64 arrays."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    encoded = tokenizer(
        list(texts), padding=True, truncation=True, max_length=seq_len, return_tensors="np"
    )
    feeds = {}
    for name in input_names:
        if name in encoded:
            feeds[name] = np.asarray(encoded[name], dtype=np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros_like(np.asarray(encoded["input_ids"]), dtype=np.int64)
        else:
            raise InvalidInput(f"the tokenizer does not produce model input {name!r}")
    return feeds


def batches(
    feeds: dict[str, np.ndarray], batch_size: int, labels: np.ndarray | None = None
) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray] | None]:
    """Split stacked arrays (leading dim = examples) into batches; trims all-pad columns."""
    count = len(next(iter(feeds.values())))
    out, label_out = [], [] if labels is not None else None
    for start in range(0, count, batch_size):
        batch = {name: array[start : start + batch_size] for name, array in feeds.items()}
        if "attention_mask" in batch and batch["attention_mask"].ndim == 2:
            width = int(batch["attention_mask"].sum(axis=1).max())
            batch = {k: (v[:, : max(width, 1)] if v.ndim == 2 else v) for k, v in batch.items()}
        out.append(batch)
        if labels is not None:
            label_out.append(labels[start : start + batch_size])
    return out, label_out


def resolve_dims(
    spec: IOSpec, batch: int, seq_len: int, family: str, *, sequence_dims: bool = True
) -> tuple[int, ...]:
    """Concrete shape for a graph input: dim 0 -> batch, symbolic dims -> seq/image size."""
    dims = []
    for axis, dim in enumerate(spec.dims):
        if axis == 0 and (not isinstance(dim, int) or dim <= 0 or dim == batch):
            dims.append(batch)
        elif isinstance(dim, int) and dim > 0:
            dims.append(dim)
        elif family == "transformer" or (sequence_dims and len(spec.dims) <= 3):
            dims.append(seq_len)
        else:
            dims.append(DEFAULT_IMAGE_SIDE)
    return tuple(dims)


def synthetic_feeds(
    specs: Sequence[IOSpec],
    count: int,
    seq_len: int,
    family: str,
    meta: dict[str, Any],
    *,
    seed: int = 0,
    full_mask: bool = False,
) -> dict[str, np.ndarray]:
    """Random inputs shaped like the graph's: token ids / masks for transformers, N(0,1) else."""
    rng = np.random.default_rng(seed)
    vocab = max(int(meta.get("vocab_size") or 0), 0) or 1000
    feeds: dict[str, np.ndarray] = {}
    lengths = None
    for spec in specs:
        shape = resolve_dims(spec, count, seq_len, family)
        dtype = np.dtype(spec.dtype)
        if spec.name == "input_ids":
            feeds[spec.name] = rng.integers(1, vocab, size=shape).astype(dtype)
        elif spec.name == "attention_mask" and len(shape) == 2:
            if lengths is None:
                low = max(1, shape[1] // 4)
                lengths = shape[1] if full_mask else rng.integers(low, shape[1] + 1, size=shape[0])
            mask = (np.arange(shape[1])[None, :] < np.reshape(lengths, (-1, 1))).astype(dtype)
            feeds[spec.name] = mask
        elif dtype.kind in "iu":
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def load_calibration(
    path: Path | None,
    specs: Sequence[IOSpec],
    *,
    family: str,
    meta: dict[str, Any],
    tokenizer_dir: Path | None,
    batch_size: int,
    seq_len: int,
    examples: int = DEFAULT_EXAMPLES,
) -> dict[str, Any]:
    """Build ``PassContext.calibration``: ``inputs`` (calibration batches), ``eval`` (held-out
    batches), ``eval_labels``, ``labels``, ``texts``, ``synthetic`` and ``source``."""
    input_names = [spec.name for spec in specs]
    eval_batch = max(1, min(batch_size, 16))
    texts: list[str] | None = None
    labels: np.ndarray | None = None
    if path is None:
        if tokenizer_dir is not None and family == "transformer":
            sentences = pydoc_sentences()
            calib_texts, eval_texts = split_texts(sentences, examples, examples)
            texts = calib_texts + eval_texts
            calib = tokenize(tokenizer_dir, calib_texts, seq_len, input_names)
            held = tokenize(tokenizer_dir, eval_texts, seq_len, input_names)
            source = "pydoc_data.topics sentences (built-in English text, not user data)"
            prune_texts = pruning_texts(sentences, eval_texts, PRUNING_EXAMPLES)
            data = _assemble(
                calib, held, None, eval_batch, synthetic=True, source=source, texts=texts
            )
            prune = tokenize(tokenizer_dir, prune_texts, seq_len, input_names)
            data["pruning_inputs"], _ = batches(prune, eval_batch)
            return data
        calib = synthetic_feeds(specs, examples, seq_len, family, meta, seed=1)
        held = synthetic_feeds(specs, examples, seq_len, family, meta, seed=2)
        source = "synthetic random inputs (no calibration data given)"
        return _assemble(calib, held, None, eval_batch, synthetic=True, source=source, texts=texts)
    if not path.is_file():
        raise InvalidInput(f"calibration file {path.name!r} does not exist")
    if path.suffix.lower() == ".npz":
        feeds, labels = _read_npz(path, specs)
    else:
        if tokenizer_dir is None:
            raise InvalidInput(
                "calibration: a text file needs a model with a tokenizer; upload an .npz of "
                f"input tensors ({', '.join(input_names)}) instead"
            )
        texts, labels = _read_text(path)
        feeds = tokenize(tokenizer_dir, texts, seq_len, input_names)
    count = len(next(iter(feeds.values())))
    if count < 2:
        calib, held, held_labels = feeds, feeds, labels
    else:
        half = count // 2
        calib = {k: v[:half] for k, v in feeds.items()}
        held = {k: v[half:] for k, v in feeds.items()}
        held_labels = labels[half:] if labels is not None else None
    return _assemble(
        calib, held, held_labels, eval_batch, synthetic=False, source=path.name, texts=texts
    )


def _assemble(
    calib: dict[str, np.ndarray],
    held: dict[str, np.ndarray],
    held_labels: np.ndarray | None,
    batch_size: int,
    *,
    synthetic: bool,
    source: str,
    texts: list[str] | None,
) -> dict[str, Any]:
    calib_batches, _ = batches(calib, batch_size)
    eval_batches, eval_labels = batches(held, batch_size, held_labels)
    return {
        "inputs": calib_batches,
        "eval": eval_batches,
        "eval_labels": eval_labels,
        "labels": held_labels,
        "texts": texts,
        "synthetic": synthetic,
        "source": source,
        "examples": {
            "calibration": len(next(iter(calib.values()))),
            "eval": len(next(iter(held.values()))),
        },
    }


def _read_npz(path: Path, specs: Sequence[IOSpec]) -> tuple[dict, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except ValueError as exc:
        raise InvalidInput(f"calibration {path.name}: object arrays are refused: {exc}") from exc
    except Exception as exc:
        raise InvalidInput(f"calibration {path.name}: not a readable .npz: {exc}") from exc
    labels = arrays.pop("labels", None)
    if labels is None:
        labels = arrays.pop("label", None)
    feeds = {}
    for spec in specs:
        if spec.name not in arrays:
            raise InvalidInput(
                f"calibration {path.name}: missing input {spec.name!r}; expected arrays "
                f"{', '.join(s.name for s in specs)} (plus optional 'labels')"
            )
        array = arrays[spec.name]
        if array.ndim != len(spec.dims):
            raise InvalidInput(
                f"calibration {path.name}: {spec.name!r} has {array.ndim} dims, the model "
                f"expects {len(spec.dims)} (leading dim = examples)"
            )
        feeds[spec.name] = array.astype(np.dtype(spec.dtype), copy=False)
    counts = {name: len(a) for name, a in feeds.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise InvalidInput(f"calibration {path.name}: arrays disagree on example count {counts}")
    count = next(iter(counts.values()))
    if labels is not None and len(labels) != count:
        raise InvalidInput(f"calibration {path.name}: {len(labels)} labels for {count} examples")
    return feeds, labels


def _read_text(path: Path) -> tuple[list[str], np.ndarray | None]:
    """One example per line; an optional integer label after a final tab."""
    try:
        lines = [line for line in path.read_text("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"calibration {path.name}: not UTF-8 text: {exc}") from exc
    if not lines:
        raise InvalidInput(f"calibration {path.name}: no examples (one per line expected)")
    texts, labels = [], []
    for line in lines:
        text, _, label = line.rpartition("\t")
        if text and label.strip().lstrip("-").isdigit():
            texts.append(text)
            labels.append(int(label))
        else:
            texts.append(line)
    if labels and len(labels) != len(texts):
        raise InvalidInput(f"calibration {path.name}: label every line or none (text<TAB>label)")
    return texts, (np.asarray(labels, dtype=np.int64) if labels else None)
