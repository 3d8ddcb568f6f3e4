"""Real text available on any machine (CPython's documentation topics) and tokenization helpers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


def doc_sentences(min_words: int = 5) -> list[str]:
    """Sentences from ``pydoc_data.topics`` (the CPython docs), in a fixed order."""
    from pydoc_data.topics import topics

    sentences: list[str] = []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            if len(sentence.split()) >= min_words:
                sentences.append(sentence.strip())
    return sentences


def doc_passages(n: int, words: int = 110, offset: int = 0) -> list[str]:
    """``n`` passages of about ``words`` words each (long enough to fill ~128 tokens)."""
    sentences = doc_sentences()
    passages, current = [], []
    for sentence in sentences[offset:]:
        current.extend(sentence.split())
        if len(current) >= words:
            passages.append(" ".join(current[:words]))
            current = []
            if len(passages) == n:
                break
    return passages


def split_calibration(texts: Sequence[str], held_out: float = 0.3) -> tuple[list[str], list[str]]:
    """Deterministic interleaved split into (calibration, held-out)."""
    step = max(2, round(1 / held_out))
    held = [t for i, t in enumerate(texts) if i % step == 0]
    cal = [t for i, t in enumerate(texts) if i % step != 0]
    return cal, held


def tokenize(tokenizer: Any, texts: Sequence[str], max_len: int, pad_to_max: bool = False) -> Batch:
    """Token ids and attention mask (int64) for ``texts``."""
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_len,
        padding="max_length" if pad_to_max else "longest",
        return_tensors="np",
    )
    return {
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
    }


def right_pad(sequences: Sequence[np.ndarray], pad_id: int = 0) -> Batch:
    """Token id rows right-padded to the longest: ``input_ids`` and ``attention_mask`` (int64)."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def batches(tokenizer: Any, texts: Sequence[str], batch_size: int, max_len: int) -> list[Batch]:
    """``texts`` tokenized in batches of ``batch_size`` (each padded to its longest)."""
    return [
        tokenize(tokenizer, texts[i : i + batch_size], max_len)
        for i in range(0, len(texts), batch_size)
    ]
