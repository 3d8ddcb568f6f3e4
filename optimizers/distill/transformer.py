"""Transformer-encoder students: keep every k-th teacher layer (DistilBERT-style) and optionally
the most important FFN neurons; train on mean-pooled embeddings (cosine + MSE) plus an optional
token-level hidden-state term, against teacher outputs computed once."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from optimizers.distill.data import Split
from optimizers.transformer.data import right_pad


def encoder_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the encoder's layer list, and that list's attribute name.

    Supports BERT-style (``encoder.layer``) and DistilBERT-style (``transformer.layer``) models.
    """
    for owner_name in ("encoder", "transformer"):
        owner = getattr(model, owner_name, None)
        if owner is None:
            base = getattr(model, "base_model", None)
            owner = getattr(base, owner_name, None) if base is not model else None
        for attr in ("layer", "layers"):
            if isinstance(getattr(owner, attr, None), nn.ModuleList):
                return owner, attr
    raise ValueError(f"{type(model).__name__} has no encoder layer list (encoder.layer)")


def default_keep_layers(n_layers: int, stride: int, offset: int) -> tuple[int, ...]:
    """Every ``stride``-th layer starting at ``offset`` (DistilBERT keeps 0, 2, 4, ...)."""
    keep = tuple(range(min(offset, n_layers - 1), n_layers, stride))
    return keep or (n_layers - 1,)


def _set_layer_count(config: Any, n: int) -> None:
    for key in ("num_hidden_layers", "n_layers"):
        if hasattr(config, key):
            setattr(config, key, n)


def _shrink_ffn(layer: nn.Module, fraction: float) -> int | None:
    """Keep one BERT layer's FFN neurons with the largest weight norms; returns the width."""
    inter = getattr(getattr(layer, "intermediate", None), "dense", None)
    out = getattr(getattr(layer, "output", None), "dense", None)
    if not isinstance(inter, nn.Linear) or not isinstance(out, nn.Linear):
        return None
    width = inter.out_features
    keep = max(1, round(width * fraction))
    importance = inter.weight.detach().abs().sum(1) * out.weight.detach().abs().sum(0)
    index = importance.topk(keep).indices.sort().values
    new_inter = nn.Linear(inter.in_features, keep, bias=inter.bias is not None)
    new_out = nn.Linear(keep, out.out_features, bias=out.bias is not None)
    with torch.no_grad():
        new_inter.weight.copy_(inter.weight[index])
        if inter.bias is not None:
            new_inter.bias.copy_(inter.bias[index])
        new_out.weight.copy_(out.weight[:, index])
        if out.bias is not None:
            new_out.bias.copy_(out.bias)
    layer.intermediate.dense = new_inter
    layer.output.dense = new_out
    return keep


def build_layer_student(
    teacher: nn.Module, keep_layers: Sequence[int], ffn_fraction: float = 1.0
) -> nn.Module:
    """A copy of ``teacher`` with only ``keep_layers`` of its encoder layers (weights copied),
    optionally with each layer's FFN cut to ``ffn_fraction`` of its neurons."""
    owner, attr = encoder_layers(teacher)
    n_layers = len(getattr(owner, attr))
    if any(i >= n_layers for i in keep_layers):
        raise ValueError(f"keep_layers {list(keep_layers)} out of range: teacher has {n_layers}")
    student = copy.deepcopy(teacher)
    s_owner, s_attr = encoder_layers(student)
    layers = getattr(s_owner, s_attr)
    setattr(s_owner, s_attr, nn.ModuleList([layers[i] for i in keep_layers]))
    config = getattr(student, "config", None)
    if config is not None:
        _set_layer_count(config, len(keep_layers))
    if ffn_fraction < 1.0:
        widths = {_shrink_ffn(layer, ffn_fraction) for layer in getattr(s_owner, s_attr)}
        if config is not None and widths and None not in widths:
            config.intermediate_size = widths.pop()
    student.eval()
    return student


def freeze_embeddings(model: nn.Module) -> int:
    """Stop training the token/position embedding tables (most of a small encoder's parameters,
    and the student already shares them with the teacher); returns the number frozen."""
    frozen = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.weight.requires_grad_(False)
            frozen += module.weight.numel()
    return frozen


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def encoder_flops(config: Any, seq_len: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one sequence through the encoder layers."""
    hidden = config.hidden_size
    ffn = config.intermediate_size
    layers = config.num_hidden_layers
    per_token = 4 * hidden * hidden + 2 * hidden * ffn + 2 * seq_len * hidden
    return 2 * layers * seq_len * per_token


def last_hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden state ``[batch, seq, hidden]``."""
    out = model(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors over the attention mask (sentence-transformers pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def pad(sequences: Sequence[np.ndarray], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id sequences into ``input_ids`` and ``attention_mask`` tensors."""
    batch = right_pad(sequences, pad_id)
    return torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])


def tokenize(texts: Sequence[str], tokenizer: Any, max_len: int) -> list[np.ndarray]:
    """Token ids of each text, truncated to ``max_len`` (special tokens included)."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]
    return [np.asarray(ids, dtype=np.int64) for ids in encoded]


def sequences_from_arrays(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Per-example token ids from padded ``input_ids`` (+ ``attention_mask``) arrays."""
    ids = np.asarray(inputs["input_ids"], dtype=np.int64)
    mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)), dtype=bool)
    return [row[m] for row, m in zip(ids, mask, strict=True)]


def augment_sequences(
    sequences: Sequence[np.ndarray],
    sources: Sequence[int],
    count: int,
    rng: np.random.Generator,
    *,
    crop_prob: float = 0.5,
    replace_prob: float = 0.1,
    min_tokens: int = 4,
) -> list[np.ndarray]:
    """``count`` new training inputs made from the user's own sequences (TinyBERT-style data
    augmentation, without a second model): each copies a random ``sources`` sequence, keeps a
    random contiguous span of its inner tokens with probability ``crop_prob``, and replaces
    each inner token with probability ``replace_prob`` by a token drawn from the sources'
    tokens (their unigram distribution). The first and last tokens ([CLS], [SEP]) are kept;
    a result that would equal its source gets one token replaced. Sequences of at most
    ``min_tokens`` + 2 tokens are not cropped."""
    if count <= 0 or not len(sources):
        return []
    pool = np.concatenate([sequences[i][1:-1] for i in sources if len(sequences[i]) > 2])
    if not len(pool):
        return []
    out = []
    for source in rng.choice(np.asarray(sources), size=count):
        seq = sequences[source]
        head, inner, tail = seq[:1], seq[1:-1], seq[-1:]
        if len(inner) > min_tokens and rng.random() < crop_prob:
            length = int(rng.integers(min_tokens, len(inner)))
            start = int(rng.integers(0, len(inner) - length + 1))
            inner = inner[start : start + length]
        inner = inner.copy()
        replace = rng.random(len(inner)) < replace_prob
        inner[replace] = rng.choice(pool, size=int(replace.sum()))
        if len(inner) == len(seq) - 2 and np.array_equal(inner, seq[1:-1]) and len(inner):
            at = int(rng.integers(len(inner)))
            others = pool[pool != inner[at]]
            if len(others):
                inner[at] = rng.choice(others)
        out.append(np.concatenate([head, inner, tail]).astype(np.int64))
    return out


def layer_targets(keep_layers: Sequence[int], n_teacher: int, mode: str) -> tuple[int, ...]:
    """For each student layer, the teacher hidden state (1 = after teacher layer 0) it imitates.

    ``skip``: the state the teacher hands to the next kept layer (student layer i stands in for
    teacher layers ``keep[i]..keep[i+1]-1``, so it starts right where its copy left off);
    ``uniform``: every ``n_teacher / n_student``-th layer (MiniLM / TinyBERT).
    """
    n = len(keep_layers)
    if mode == "skip":
        return (*keep_layers[1:], n_teacher)
    if mode == "uniform":
        return tuple(round((i + 1) * n_teacher / n) for i in range(n))
    raise ValueError(f"unknown layer map {mode!r} (skip or uniform)")


def fast_bf16_matmul() -> bool:
    """Whether this CPU has AMX tiles, where oneDNN's bfloat16 matmuls run several times faster
    than float32 (measured 2.5x for the student's GEMMs); without AMX bfloat16 autocast only adds
    casts."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check and check()) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> torch.dtype | None:
    """The autocast dtype for student training: None for ``fp32``, bfloat16 for ``bf16``, and
    for ``auto`` bfloat16 only where :func:`fast_bf16_matmul` says it pays."""
    if precision == "bf16" or (precision == "auto" and fast_bf16_matmul()):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str | None) -> Iterator[None]:
    """Run the block with the Hugging Face model's attention implementation set to ``name``
    (None: unchanged), restoring it afterwards. Used for bfloat16 training: PyTorch's CPU
    flash-attention backward is ~13x slower in bfloat16 than in float32 (66 vs 5 ms per layer
    at batch 32), while the eager attention's matmuls run on AMX like the rest."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if name is None or config is None or previous is None:
        yield
        return
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def hidden_states(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Every hidden state of the encoder: embeddings first, then each layer's output."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return tuple(out.hidden_states)


def _token_cosine_loss(
    student: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over real tokens of 1 - cosine(student token, teacher token)."""
    cos = nn.functional.cosine_similarity(student, target, dim=-1)
    m = mask.to(student.dtype)
    return ((1 - cos) * m).sum() / m.sum()


def _kl_rows(target: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over heads and real query rows of KL(target row || student row); both are
    [batch, heads, L, L] distributions over keys (zero on padded keys)."""
    kl = (torch.special.xlogy(target, target) - target * student.clamp_min(1e-8).log()).sum(-1)
    rows = mask.to(kl.dtype)[:, None, :].expand_as(kl)
    return (kl * rows).sum() / rows.sum()


def relation(
    left: torch.Tensor, right: torch.Tensor, mask: torch.Tensor, heads: int
) -> torch.Tensor:
    """Per head, softmax over keys of left right^T / sqrt(head size), padded keys excluded:
    with queries and keys, a self-attention distribution; with values twice, MiniLM's value
    relation. ``left``, ``right``: [batch, L, hidden]; returns [batch, heads, L, L]."""
    batch, length, hidden = left.shape

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, length, heads, hidden // heads).transpose(1, 2)

    scores = split(left) @ split(right).transpose(-1, -2) / math.sqrt(hidden // heads)
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def qkv_projections(model: nn.Module) -> list[nn.Module]:
    """The last encoder layer's query, key and value projections (BERT / RoBERTa / MiniLM
    ``attention.self.query``..., DistilBERT ``attention.q_lin``...); empty when not found."""
    owner, attr = encoder_layers(model)
    attention = getattr(getattr(owner, attr)[-1], "attention", None)
    for holder, names in (
        (getattr(attention, "self", None), ("query", "key", "value")),
        (attention, ("q_lin", "k_lin", "v_lin")),
    ):
        found = [getattr(holder, name, None) for name in names]
        if holder is not None and all(isinstance(m, nn.Linear) for m in found):
            return found
    return []


class _LastProjections:
    """Captures the last encoder layer's query, key and value projections during a forward,
    whatever attention implementation runs (the distributions are recomputed from them)."""

    def __init__(self, model: nn.Module, active: bool = True) -> None:
        self.modules = qkv_projections(model) if active else []
        if active and not self.modules:
            raise ValueError("no query/key/value projections found in the last encoder layer")
        self.outputs: dict[int, torch.Tensor] = {}

    def __enter__(self) -> _LastProjections:
        self.handles = [
            module.register_forward_hook(lambda _m, _i, out, k=k: self.outputs.__setitem__(k, out))
            for k, module in enumerate(self.modules)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def stacked(self) -> torch.Tensor:
        """[3, batch, L, hidden]: query, key, value."""
        return torch.stack([self.outputs[k] for k in range(3)])


class EmbeddingDistillTask:
    """Distil an encoder's mean-pooled sentence embeddings, optionally with feature terms.

    Response-based: 1 - cosine + normalized MSE of the mean-pooled embeddings. Feature-based
    (``hidden_weight`` > 0, TinyBERT / MiniLM style): each student layer's token vectors against
    the teacher hidden state ``layer_map[i]`` (indices into the teacher's hidden states, 0 =
    embeddings), 1 - token cosine averaged over layers. Teacher outputs are computed once.
    ``relation_weight`` > 0 adds MiniLM's (Wang et al. 2020) last-layer terms: KL divergence of
    the self-attention distributions and of the value relations, teacher to student, recomputed
    from the last layer's query/key/value projections (cached for the teacher in float16).
    ``autocast`` (e.g. ``torch.bfloat16``) runs the student's training forward under CPU
    autocast; the losses, the held-out evaluation and the weights stay float32.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        sequences: list[np.ndarray],
        split: Split,
        *,
        batch_size: int = 32,
        hidden_weight: float = 0.0,
        layer_map: Sequence[int] | None = None,
        dropout: bool = False,
        relation_weight: float = 0.0,
        autocast: torch.dtype | None = None,
        pad_id: int = 0,
    ) -> None:
        self.student = student
        self.relation_weight = relation_weight
        self.heads = int(student.config.num_attention_heads) if relation_weight > 0 else 0
        self.teacher_qkv: list[torch.Tensor] = []
        """Per example, the teacher's last-layer [query, key, value] projections, [3, L, hidden]."""
        self.autocast = autocast
        self.sequences = sequences
        self.split = split
        self.batch_size = batch_size
        self.hidden_weight = hidden_weight
        self.layer_map = tuple(layer_map) if layer_map is not None else None
        self.dropout = dropout
        self.pad_id = pad_id
        self.teacher_pooled, self.teacher_tokens = self._cache_teacher(teacher)
        train_pooled = self.teacher_pooled[split.train]
        self.pooled_scale = float(train_pooled.pow(2).mean())

    @property
    def _maps(self) -> tuple[int, ...]:
        """The teacher hidden states cached per token (the last one when no map is given)."""
        if self.hidden_weight <= 0:
            return ()
        return self.layer_map if self.layer_map is not None else (-1,)

    def _cache_teacher(self, teacher: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Teacher outputs for every example, computed once (length-sorted batches, so padding
        costs little): the pooled embedding, and the mapped token states in float16. With
        ``autocast`` the teacher runs under it too: on AMX, bf16 caching takes a third to half
        of the float32 time and its pooled embeddings keep cosine 0.99999 (min 0.99997) to the
        float32 teacher's (640 pydoc sentences), far below the student's distance to them."""
        order = np.argsort([len(s) for s in self.sequences])
        pooled = torch.zeros(len(self.sequences), 0)
        tokens: list[torch.Tensor | None] = [None] * len(self.sequences)
        maps = self._maps
        relations = self.relation_weight > 0
        self.teacher_qkv = [torch.zeros(0)] * len(self.sequences) if relations else []
        teacher.eval()
        with (
            torch.no_grad(),
            torch.autocast(
                "cpu", dtype=self.autocast or torch.bfloat16, enabled=bool(self.autocast)
            ),
            _LastProjections(teacher, relations) as projections,
        ):
            for start in range(0, len(order), 64):
                chunk = order[start : start + 64]
                ids, mask = pad([self.sequences[i] for i in chunk], self.pad_id)
                out = teacher(
                    input_ids=ids,
                    attention_mask=mask,
                    output_hidden_states=True,
                )
                states = tuple(state.float() for state in out.hidden_states)
                if relations:
                    qkv = projections.stacked().to(torch.float16)
                    for row, i in enumerate(chunk):
                        self.teacher_qkv[i] = qkv[:, row, : len(self.sequences[i])].clone()
                vectors = mean_pool(states[-1], mask)
                if pooled.shape[1] == 0:
                    pooled = torch.zeros(len(self.sequences), vectors.shape[1])
                pooled[torch.from_numpy(chunk)] = vectors
                if maps:
                    stacked = torch.stack([states[m] for m in maps], 1).to(torch.float16)
                    for row, i in enumerate(chunk):
                        tokens[i] = stacked[row, :, : len(self.sequences[i])].clone()
        return pooled, (tokens if maps else None)  # type: ignore[return-value]

    def epoch(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Shuffled batches, each drawn from a length-sorted pool so little padding is computed."""
        order = rng.permutation(self.split.train)
        pool = self.batch_size * 16
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: len(self.sequences[i]))
            batches += [
                np.asarray(chunk[b : b + self.batch_size])
                for b in range(0, len(chunk), self.batch_size)
            ]
        for index in rng.permutation(len(batches)):
            yield batches[index]

    def loss(self, batch: np.ndarray) -> torch.Tensor:
        self.student.train(self.dropout)
        relations = self.relation_weight > 0
        dtype = self.autocast or torch.bfloat16
        with (
            torch.autocast("cpu", dtype=dtype, enabled=self.autocast is not None),
            _LastProjections(self.student, relations) as projections,
        ):
            ids, mask = pad([self.sequences[i] for i in batch], self.pad_id)
            out = self.student(
                input_ids=ids,
                attention_mask=mask,
                output_hidden_states=True,
            )
        states = tuple(state.float() for state in out.hidden_states)  # losses in float32
        pooled = mean_pool(states[-1], mask)
        target = self.teacher_pooled[torch.from_numpy(batch)]
        cosine = nn.functional.cosine_similarity(pooled, target, dim=-1)
        loss = (1 - cosine).mean() + nn.functional.mse_loss(pooled, target) / self.pooled_scale
        maps = self._maps
        if maps and self.teacher_tokens is not None:
            student_layers = [states[-1]] if self.layer_map is None else list(states[1:])
            targets = torch.zeros(len(maps), *states[-1].shape)
            for row, i in enumerate(batch):
                targets[:, row, : len(self.sequences[i])] = self.teacher_tokens[i].float()
            feature = sum(
                _token_cosine_loss(hidden, targets[k], mask)
                for k, hidden in enumerate(student_layers)
            )
            loss = loss + self.hidden_weight * feature / len(maps)
        if relations:
            own = projections.stacked().float()
            target = torch.zeros_like(own)
            for row, i in enumerate(batch):
                target[:, row, : len(self.sequences[i])] = self.teacher_qkv[i].float()
            terms = sum(
                _kl_rows(
                    relation(target[a], target[b], mask, self.heads),
                    relation(own[a], own[b], mask, self.heads),
                    mask,
                )
                for a, b in ((0, 1), (2, 2))  # attention (queries, keys); value relation
            )
            loss = loss + self.relation_weight * terms
        return loss

    def held_out_cosines(self) -> np.ndarray:
        """Cosine of student vs. teacher pooled embeddings for every held-out example."""
        self.student.eval()
        holdout = self.split.holdout
        result = np.zeros(len(holdout))
        with torch.no_grad():
            order = np.argsort([len(self.sequences[i]) for i in holdout])
            for start in range(0, len(order), 64):
                rows = order[start : start + 64]
                ids, mask = pad([self.sequences[i] for i in holdout[rows]], self.pad_id)
                hidden = last_hidden(self.student, ids, mask)
                target = self.teacher_pooled[torch.from_numpy(holdout[rows])]
                cos = nn.functional.cosine_similarity(mean_pool(hidden, mask), target, dim=-1)
                result[rows] = cos.numpy()
        return result

    def evaluate(self) -> float:
        return float(self.held_out_cosines().mean())
