"""Unlabeled distillation data: a train / held-out split, and a text corpus for benches."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
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


def stdlib_docstring_sentences(
    exclude: Sequence[str] = (), modules: Sequence[str] | None = None
) -> list[str]:
    """Unique sentences of the docstrings in the standard library's own source (modules,
    classes, functions; test packages skipped), read with ``ast`` (nothing is imported), in a
    fixed order; sentences in ``exclude`` are left out; ``modules``: only these top-level
    modules (default: all of ``sys.stdlib_module_names``). English prose about Python, like
    ``python_docs_sentences``, but a different text: API docstrings, not the reference."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    seen = dict.fromkeys(exclude)
    result: list[str] = []
    for name in sorted(sys.stdlib_module_names if modules is None else modules):
        top = root / name
        files = [root / f"{name}.py"] if (root / f"{name}.py").is_file() else []
        files += sorted(top.rglob("*.py")) if top.is_dir() else []
        for file in files:
            if {"test", "tests", "idle_test"} & set(file.relative_to(root).parts):
                continue
            try:
                tree = ast.parse(file.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, _DOCUMENTED):
                    for sentence in sentences(ast.get_docstring(node) or "", min_words=5):
                        if sentence not in seen:
                            seen[sentence] = None
                            result.append(sentence)
    return result


def stack_inputs(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate calibration batches (``{name: array}`` each) along the batch axis."""
    if not batches:
        return {}
    names = list(batches[0])
    return {name: np.concatenate([np.asarray(b[name]) for b in batches], axis=0) for name in names}
