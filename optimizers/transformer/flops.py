"""FLOPs of encoder layers (2 FLOPs per multiply-add), per head and per FFN neuron."""

from __future__ import annotations

from optimizers.transformer.encoder import SlimEncoder


def head_flops(hidden: int, head_dim: int, seq_len: int) -> int:
    """One attention head at ``seq_len``: Q/K/V/O projections plus scores and context."""
    return 2 * (4 * seq_len * hidden * head_dim + 2 * seq_len * seq_len * head_dim)


def neuron_flops(hidden: int, seq_len: int) -> int:
    """One FFN neuron at ``seq_len``: one row of the input and one column of the output matrix."""
    return 2 * (2 * seq_len * hidden)


def encoder_flops(encoder: SlimEncoder, seq_len: int) -> int:
    """FLOPs of all heads and neurons of ``encoder`` for one sequence of ``seq_len`` tokens."""
    spec = encoder.spec
    hf = head_flops(spec.hidden, spec.head_dim, seq_len)
    nf = neuron_flops(spec.hidden, seq_len)
    return sum(layer.heads * hf + layer.ffn * nf for layer in encoder.layers)
