"""Unlabeled distillation data: a train / held-out split, and a text corpus for benches."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


class NotEnoughData(Exception):
    """Too few examples to hold out a validation split; the message says how many are needed."""


@dataclass(frozen=True)
class Split:
    """Indices of the training and held-out examples."""

    train: np.ndarray
    holdout: np.ndarray


def split_holdout(
    n: int, *, fraction: float, min_holdout: int, min_train: int, seed: int = 0
) -> Split:
    """Shuffle ``range(n)`` and hold out ``fraction`` of it (at least ``min_holdout``).

    Raises ``NotEnoughData`` when fewer than ``min_train`` examples would remain to train on.
    """
    n_holdout = max(min_holdout, round(n * fraction))
    if n - n_holdout < min_train:
        raise NotEnoughData(
            f"distillation needs at least {min_train + min_holdout} unlabeled examples "
            f"({min_train} to train on and {min_holdout} held out to measure fidelity), got {n}"
        )
    order = np.random.default_rng(seed).permutation(n)
    return Split(train=np.sort(order[n_holdout:]), holdout=np.sort(order[:n_holdout]))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(text: str, *, min_words: int = 4, max_words: int = 60) -> list[str]:
    """Split prose into sentences of ``min_words``..``max_words`` words (whitespace collapsed)."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(flat):
            words = sentence.split()
            if min_words <= len(words) <= max_words and sum(c.isalpha() for c in sentence) > 10:
                out.append(sentence)
    return out


def python_docs_sentences(limit: int | None = None) -> list[str]:
    """Unique sentences from the CPython documentation bundled with every Python install."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        for sentence in sentences(topics[key]):
            seen.setdefault(sentence, None)
    result = list(seen)
    return result if limit is None else result[:limit]


def stack_inputs(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate calibration batches (``{name: array}`` each) along the batch axis."""
    if not batches:
        return {}
    names = list(batches[0])
    return {name: np.concatenate([np.asarray(b[name]) for b in batches], axis=0) for name in names}
