"""A compact BERT-family encoder whose layers may differ in width.

``SlimEncoder`` holds the weights of a Hugging Face BERT / RoBERTa / DistilBERT /
MiniLM encoder in plain ``nn.Linear`` / ``nn.LayerNorm`` modules, one ``SlimLayer`` per
layer, each with its own number of attention heads and FFN neurons. That is the shape
structured pruning produces (heads and neurons physically removed, a layer with no heads
skips attention), and what token pruning and padding removal build on. The forward pass is
written to export cleanly with the legacy TorchScript ONNX exporter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

NEG_INF = -1e9


@dataclass(frozen=True)
class EncoderSpec:
    """Architecture facts of a source checkpoint."""

    model_type: str
    hidden: int
    heads: int
    head_dim: int
    ffn: int
    layers: int
    eps: float
    act: str
    pad_token_id: int
    position_offset: int  # RoBERTa numbers positions from padding_idx + 1


def _activation(name: str):
    if name in ("gelu", "gelu_new", "gelu_python"):
        return lambda x: F.gelu(x) if name == "gelu" else F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported activation {name!r} (expected gelu, gelu_new or relu)")


class SlimLayer(nn.Module):
    """One post-LN transformer layer with ``heads`` heads and ``ffn`` FFN neurons (may be 0)."""

    def __init__(
        self, hidden: int, heads: int, head_dim: int, ffn: int, eps: float, act: str
    ) -> None:
        super().__init__()
        self.hidden, self.heads, self.head_dim, self.ffn = hidden, heads, head_dim, ffn
        self.act_name = act
        self.act = _activation(act)
        width = heads * head_dim
        self.q = nn.Linear(hidden, width)
        self.k = nn.Linear(hidden, width)
        self.v = nn.Linear(hidden, width)
        self.o = nn.Linear(width, hidden)
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.fi = nn.Linear(hidden, ffn)
        self.fo = nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)

    def project_qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V projections of ``h`` (any leading shape)."""
        return self.q(h), self.k(h), self.v(h)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        head_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled dot-product attention on padded ``[B, S, heads*dh]`` tensors.

        ``bias`` is the additive key mask ``[B, 1, 1, S]``; ``head_mask`` scales each head,
        ``[heads]`` for the whole batch or ``[B, heads]`` per example. Returns the context
        ``[B, S, heads*dh]`` and the attention probabilities ``[B, heads, S, S]``.
        """
        b, s = q.shape[0], q.shape[1]
        shape = (b, s, self.heads, self.head_dim)
        qh = q.reshape(shape).transpose(1, 2)
        kh = k.reshape(shape).transpose(1, 2)
        vh = v.reshape(shape).transpose(1, 2)
        scores = torch.matmul(qh, kh.transpose(2, 3)) * (1.0 / math.sqrt(self.head_dim))
        probs = torch.softmax(scores + bias, dim=-1)
        ctx = torch.matmul(probs, vh)
        if head_mask is not None:
            ctx = ctx * head_mask.reshape(-1 if head_mask.dim() > 1 else 1, self.heads, 1, 1)
        ctx = ctx.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return ctx, probs

    def attention_out(self, ctx: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and first LayerNorm (bias only when no heads)."""
        out = self.o(ctx) if self.heads > 0 and ctx is not None else self.o.bias
        return self.ln1(out + residual)

    def feed_forward(
        self, h: torch.Tensor, neuron_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """FFN, residual and second LayerNorm (bias only when no neurons).

        ``neuron_mask`` scales each neuron: ``[ffn]``, or ``[B, 1, ffn]`` per example.
        """
        if self.ffn == 0:
            return self.ln2(self.fo.bias + h)
        act = self.act(self.fi(h))
        if neuron_mask is not None:
            act = act * neuron_mask
        return self.ln2(self.fo(act) + h)

    def forward(
        self,
        h: torch.Tensor,
        bias: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        neuron_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``h [B, S, hidden]`` -> (new h, attention probabilities or None if no heads)."""
        probs = None
        if self.heads > 0:
            q, k, v = self.project_qkv(h)
            ctx, probs = self.attend(q, k, v, bias, head_mask)
            h = self.attention_out(ctx, h)
        else:
            h = self.attention_out(None, h)
        return self.feed_forward(h, neuron_mask), probs


class SlimEmbeddings(nn.Module):
    """Word + position (+ token type) embeddings and LayerNorm."""

    def __init__(self, vocab: int, positions: int, types: int, spec: EncoderSpec) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, spec.hidden)
        self.position = nn.Embedding(positions, spec.hidden)
        self.token_type = nn.Embedding(types, spec.hidden) if types > 0 else None
        self.ln = nn.LayerNorm(spec.hidden, eps=spec.eps)
        self.position_offset = spec.position_offset

    def position_ids(self, mask: torch.Tensor) -> torch.Tensor:
        """Position ids ``[B, S]`` (RoBERTa style: counted over real tokens after the pad id)."""
        if self.position_offset:
            return torch.cumsum(mask, dim=1) * mask + self.position_offset - 1
        s = mask.shape[1]
        return torch.arange(s, device=mask.device).unsqueeze(0).expand_as(mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.word(input_ids) + self.position(position_ids)
        if self.token_type is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            emb = emb + self.token_type(types)
        return self.ln(emb)


def key_bias(mask: torch.Tensor) -> torch.Tensor:
    """Additive attention bias ``[B, 1, 1, S]`` from a 0/1 mask ``[B, S]``."""
    return (1.0 - mask.to(torch.float32))[:, None, None, :] * NEG_INF


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``h [B, S, H]`` over the real tokens of ``mask [B, S]``."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class SlimEncoder(nn.Module):
    """Embeddings plus a stack of ``SlimLayer`` (widths may differ per layer)."""

    def __init__(self, spec: EncoderSpec, embeddings: SlimEmbeddings, layers: list[SlimLayer]):
        super().__init__()
        self.spec = spec
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)

    @property
    def heads_per_layer(self) -> list[int]:
        return [layer.heads for layer in self.layers]

    @property
    def ffn_per_layer(self) -> list[int]:
        return [layer.ffn for layer in self.layers]

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mask = attention_mask.to(torch.long)
        return self.embeddings(input_ids, self.embeddings.position_ids(mask), token_type_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        head_masks: torch.Tensor | None = None,
        neuron_masks: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``last_hidden_state [B, S, hidden]``; optional per-layer head/neuron masks.

        ``head_masks[i]`` / ``neuron_masks[i]`` are layer ``i``'s masks in the shapes
        ``SlimLayer.attend`` / ``SlimLayer.feed_forward`` take (shared or per example).
        """
        h = self.embed(input_ids, attention_mask, token_type_ids)
        bias = key_bias(attention_mask)
        for i, layer in enumerate(self.layers):
            hm = head_masks[i] if head_masks is not None else None
            nm = neuron_masks[i] if neuron_masks is not None else None
            h, _ = layer(h, bias, hm, nm)
        return h


class PooledEncoder(nn.Module):
    """Export wrapper: ``(input_ids, attention_mask) -> (last_hidden_state, embedding)``."""

    def __init__(self, encoder: SlimEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ):
        h = self.encoder(input_ids, attention_mask, token_type_ids)
        return h, mean_pool(h, attention_mask)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (elements)."""
    return sum(p.numel() for p in module.parameters())


def random_encoder(
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    ffn: int = 128,
    vocab: int = 200,
    seed: int = 0,
    std: float = 0.1,
) -> SlimEncoder:
    """A random-init BERT-style ``SlimEncoder`` (tests and examples; no transformers import).

    Every parameter, LayerNorms and biases included, is drawn at random so no two tensors
    are equal (the ONNX exporter would de-duplicate equal initializers).
    """
    spec = EncoderSpec("bert", hidden, heads, hidden // heads, ffn, layers, 1e-12, "gelu", 0, 0)
    gen = torch.Generator().manual_seed(seed)
    emb = SlimEmbeddings(vocab, 512, 2, spec)
    blocks = [SlimLayer(hidden, heads, hidden // heads, ffn, 1e-12, "gelu") for _ in range(layers)]
    encoder = SlimEncoder(spec, emb, blocks)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            base = 1.0 if name.endswith("weight") and ".ln" in f".{name}" else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=gen))
            if name.startswith("embeddings.") and p.dim() == 2:
                p.mul_(10.0)
    return encoder.eval()
