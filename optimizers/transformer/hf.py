"""Convert Hugging Face BERT-family encoders (BERT, MiniLM, RoBERTa, DistilBERT) to ``SlimEncoder``.

Checkpoints are loaded offline from a local folder, safetensors only, never with
``trust_remote_code``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from optimizers.transformer.encoder import EncoderSpec, SlimEmbeddings, SlimEncoder, SlimLayer

SUPPORTED = ("bert", "roberta", "xlm-roberta", "distilbert", "camembert")


def load_hf_encoder(folder: Path) -> nn.Module:
    """Load the base encoder of a local HF checkpoint (eager attention, eval mode)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(
        str(folder), attn_implementation="eager", use_safetensors=True, trust_remote_code=False
    )
    return model.eval()


def _copy_linear(dst: nn.Linear, src: nn.Linear) -> None:
    dst.weight.data.copy_(src.weight.data)
    dst.bias.data.copy_(src.bias.data)


def _copy_ln(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    dst.weight.data.copy_(src.weight.data)
    dst.bias.data.copy_(src.bias.data)


def _spec(config: Any) -> EncoderSpec:
    mt = config.model_type
    if mt not in SUPPORTED:
        raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED)}")
    if mt == "distilbert":
        hidden, heads, ffn, layers = config.dim, config.n_heads, config.hidden_dim, config.n_layers
        act, eps, offset = config.activation, 1e-12, 0
    else:
        hidden, heads = config.hidden_size, config.num_attention_heads
        ffn, layers = config.intermediate_size, config.num_hidden_layers
        act, eps = config.hidden_act, config.layer_norm_eps
        pet = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if pet != "absolute":
            raise ValueError(f"unsupported position_embedding_type {pet!r} (need 'absolute')")
        offset = config.pad_token_id + 1 if mt != "bert" else 0
    return EncoderSpec(
        model_type=mt,
        hidden=hidden,
        heads=heads,
        head_dim=hidden // heads,
        ffn=ffn,
        layers=layers,
        eps=eps,
        act=act,
        pad_token_id=config.pad_token_id or 0,
        position_offset=offset,
    )


def from_hf(model: nn.Module) -> SlimEncoder:
    """A ``SlimEncoder`` with the same weights as the HF encoder ``model``."""
    base = getattr(model, "base_model", model)
    spec = _spec(base.config)
    emb_src = base.embeddings
    types = 0 if spec.model_type == "distilbert" else base.config.type_vocab_size
    emb = SlimEmbeddings(
        emb_src.word_embeddings.num_embeddings,
        emb_src.position_embeddings.num_embeddings,
        types,
        spec,
    )
    emb.word.weight.data.copy_(emb_src.word_embeddings.weight.data)
    emb.position.weight.data.copy_(emb_src.position_embeddings.weight.data)
    if emb.token_type is not None:
        emb.token_type.weight.data.copy_(emb_src.token_type_embeddings.weight.data)
    _copy_ln(emb.ln, emb_src.LayerNorm)

    layers = []
    src_layers = base.transformer.layer if spec.model_type == "distilbert" else base.encoder.layer
    for src in src_layers:
        layer = SlimLayer(spec.hidden, spec.heads, spec.head_dim, spec.ffn, spec.eps, spec.act)
        if spec.model_type == "distilbert":
            a = src.attention
            pairs = [
                (layer.q, a.q_lin),
                (layer.k, a.k_lin),
                (layer.v, a.v_lin),
                (layer.o, a.out_lin),
                (layer.fi, src.ffn.lin1),
                (layer.fo, src.ffn.lin2),
            ]
            lns = [(layer.ln1, src.sa_layer_norm), (layer.ln2, src.output_layer_norm)]
        else:
            a = src.attention
            pairs = [
                (layer.q, a.self.query),
                (layer.k, a.self.key),
                (layer.v, a.self.value),
                (layer.o, a.output.dense),
                (layer.fi, src.intermediate.dense),
                (layer.fo, src.output.dense),
            ]
            lns = [(layer.ln1, a.output.LayerNorm), (layer.ln2, src.output.LayerNorm)]
        for dst, s in pairs:
            _copy_linear(dst, s)
        for dst, s in lns:
            _copy_ln(dst, s)
        layers.append(layer)
    return SlimEncoder(spec, emb, layers).eval()


def tiny_bert(
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    ffn: int = 128,
    vocab: int = 200,
) -> nn.Module:
    """A small random-init ``BertModel`` (for tests and examples)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    return BertModel(config, add_pooling_layer=False).eval()
