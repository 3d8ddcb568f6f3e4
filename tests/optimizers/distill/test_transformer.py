"""Transformer students: a layer-dropped copy of a (tiny, random-init) BERT teacher is really
smaller, its loss decreases and its held-out embedding cosine beats the untrained student's;
the pass exports it to ONNX and reports size, FLOPs, the curve and speed."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import optimizers.distill.passes  # noqa: F401  (registers the distill pass)
from optimizers.calibration import batches, tokenize
from optimizers.distill import transformer as tr
from optimizers.distill.data import python_docs_sentences, split_holdout
from optimizers.distill.trainer import train
from optimizers.loaders import load_hf_checkpoint
from optimizers.passes.base import Artifact, PassContext, PassNotApplicable
from optimizers.registry import get_pass
from tests.optimizers.tiny import tiny_bert_checkpoint


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert_checkpoint(tmp_path_factory.mktemp("distill_bert") / "ckpt", layers=4)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return python_docs_sentences()[:400]


def test_student_keeps_chosen_layers_and_is_smaller(teacher_dir):
    teacher = load_hf_checkpoint(teacher_dir).artifact.torch_model
    student = tr.build_layer_student(teacher, (1, 3), ffn_fraction=0.5)
    assert student.config.num_hidden_layers == 2
    assert len(student.encoder.layer) == 2
    assert len(teacher.encoder.layer) == 4  # the teacher is untouched
    assert student.config.intermediate_size == 64
    assert tr.count_parameters(student) < tr.count_parameters(teacher)
    # 2 FLOPs per MAC x layers x tokens x (QKV+out 4h^2, FFN 2h*ffn, attention 2*s*h)
    assert tr.encoder_flops(student.config, 128) == 2 * 2 * 128 * (
        4 * 64 * 64 + 2 * 64 * 64 + 2 * 128 * 64
    )
    assert tr.encoder_flops(student.config, 128) < 0.45 * tr.encoder_flops(teacher.config, 128)
    layer = teacher.encoder.layer[3].attention.self.query.weight
    torch.testing.assert_close(student.encoder.layer[1].attention.self.query.weight, layer)
    assert tr.default_keep_layers(6, 2, 0) == (0, 2, 4)
    assert tr.default_keep_layers(6, 2, 1) == (1, 3, 5)


def test_training_lowers_loss_and_beats_the_untrained_student(teacher_dir, texts):
    loaded = load_hf_checkpoint(teacher_dir)
    teacher = loaded.artifact.torch_model
    from transformers import AutoTokenizer

    sequences = tr.tokenize(texts, AutoTokenizer.from_pretrained(str(teacher_dir)), 64)
    split = split_holdout(len(sequences), fraction=0.2, min_holdout=16, min_train=64)
    student = tr.build_layer_student(teacher, (0, 2))
    task = tr.EmbeddingDistillTask(teacher, student, sequences, split, batch_size=16)
    untrained = task.held_out_cosines()
    log = train(
        task,
        lr=1e-3,
        weight_decay=0.01,
        warmup_steps=5,
        eval_every=10,
        patience=10,
        budget_s=120,
        max_steps=60,
    )
    trained = task.held_out_cosines()
    assert log.steps == 60
    assert log.stop_reason == "max_steps"
    assert log.loss_window(first=False) < 0.5 * log.loss_window(first=True)
    # a random-init teacher's embeddings are nearly parallel: compare the remaining error
    assert 1 - trained.mean() < 0.5 * (1 - untrained.mean())
    assert trained.mean() == pytest.approx(log.best_fidelity, abs=1e-6)
    assert log.curve[0] == (0, pytest.approx(untrained.mean(), abs=1e-6))


def test_hidden_state_term_adds_a_token_level_loss(teacher_dir, texts):
    from transformers import AutoTokenizer

    teacher = load_hf_checkpoint(teacher_dir).artifact.torch_model
    sequences = tr.tokenize(texts[:96], AutoTokenizer.from_pretrained(str(teacher_dir)), 32)
    split = split_holdout(len(sequences), fraction=0.2, min_holdout=16, min_train=64)
    student = tr.build_layer_student(teacher, (0,))
    plain = tr.EmbeddingDistillTask(teacher, student, sequences, split)
    tokens = tr.EmbeddingDistillTask(teacher, student, sequences, split, hidden_weight=1.0)
    assert tokens.teacher_tokens is not None
    assert tokens.teacher_tokens[0].shape == (1, len(sequences[0]), 64)  # the last layer
    batch = split.train[:16]
    with_tokens = tokens.loss(batch)
    assert with_tokens.item() > plain.loss(batch).item()
    with_tokens.backward()
    assert student.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0
    # the teacher against itself has no loss left, token term included
    tokens.student = teacher
    assert tokens.loss(batch).item() == pytest.approx(0.0, abs=1e-4)


def test_qkv_projections_of_a_distilbert_layout():
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=2, n_heads=2)
    model = DistilBertModel(config)
    attention = model.transformer.layer[-1].attention
    assert tr.qkv_projections(model) == [attention.q_lin, attention.k_lin, attention.v_lin]
    del attention.v_lin  # an unknown layout: no relation terms rather than a crash
    assert tr.qkv_projections(model) == []


def test_relation_is_a_distribution_over_real_keys():
    values = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    relation = tr.relation(values, values, mask, heads=2)
    assert relation.shape == (2, 2, 5, 5)
    torch.testing.assert_close(relation.sum(-1), torch.ones(2, 2, 5))
    assert torch.all(relation[1, :, :, 3:] == 0)
    head = values[0, :, 4:]  # the second head's slice, by hand
    expected = (head @ head.T / 2.0).softmax(-1)
    torch.testing.assert_close(relation[0, 1], expected)


def test_relation_terms_vanish_for_the_teacher_and_train_the_student(teacher_dir, texts):
    from transformers import AutoTokenizer

    teacher = load_hf_checkpoint(teacher_dir).artifact.torch_model
    sequences = tr.tokenize(texts[:96], AutoTokenizer.from_pretrained(str(teacher_dir)), 32)
    split = split_holdout(len(sequences), fraction=0.2, min_holdout=16, min_train=64)
    student = tr.build_layer_student(teacher, (0, 2))
    plain = tr.EmbeddingDistillTask(teacher, student, sequences, split)
    related = tr.EmbeddingDistillTask(teacher, student, sequences, split, relation_weight=1.0)
    assert tr.qkv_projections(student) == [
        getattr(student.encoder.layer[-1].attention.self, name)
        for name in ("query", "key", "value")
    ]
    assert related.teacher_qkv[0].shape == (3, len(sequences[0]), 64)
    batch = split.train[:16]
    with_relations = related.loss(batch)
    assert with_relations.item() > plain.loss(batch).item()
    with_relations.backward()
    value = student.encoder.layer[-1].attention.self.value.weight
    assert value.grad is not None
    assert value.grad.abs().sum() > 0
    related.student = teacher  # the teacher against itself has nothing left to learn
    assert related.loss(batch).item() == pytest.approx(0.0, abs=1e-3)
    # the attention term is the model's own attention: recomputed = HF's eager probabilities
    ids, mask = tr.pad([sequences[i] for i in batch])
    with torch.no_grad(), tr.attention_implementation(teacher, "eager"):
        with tr._LastProjections(teacher) as projections:
            out = teacher(input_ids=ids, attention_mask=mask, output_attentions=True)
        qkv = projections.stacked()
    recomputed = tr.relation(qkv[0], qkv[1], mask, heads=4)
    real = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
    torch.testing.assert_close(
        recomputed[real.expand_as(recomputed)], out.attentions[-1][real.expand_as(recomputed)]
    )


def test_layer_maps_pick_the_teacher_states_each_student_layer_imitates():
    assert tr.layer_targets((0, 3, 5), 6, "skip") == (3, 5, 6)
    assert tr.layer_targets((0, 3, 5), 6, "uniform") == (2, 4, 6)
    assert tr.layer_targets((0, 2), 4, "uniform") == (2, 4)
    with pytest.raises(ValueError, match="unknown layer map"):
        tr.layer_targets((0,), 4, "diagonal")


def test_feature_terms_match_every_mapped_layer(teacher_dir, texts):
    from transformers import AutoTokenizer

    teacher = load_hf_checkpoint(teacher_dir).artifact.torch_model
    sequences = tr.tokenize(texts[:96], AutoTokenizer.from_pretrained(str(teacher_dir)), 32)
    split = split_holdout(len(sequences), fraction=0.2, min_holdout=16, min_train=64)
    keep = (0, 2)
    student = tr.build_layer_student(teacher, keep)
    layer_map = tr.layer_targets(keep, 4, "skip")
    task = tr.EmbeddingDistillTask(
        teacher, student, sequences, split, hidden_weight=1.0, layer_map=layer_map
    )
    first = task.teacher_tokens[0]
    assert first.shape == (2, len(sequences[0]), 64)
    ids, mask = tr.pad([sequences[0]])
    states = tr.hidden_states(teacher, ids, mask)
    # the cached targets are the teacher's states after layers 2 and 4 (fp16)
    torch.testing.assert_close(first[0].float(), states[2][0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(first[1].float(), states[4][0], atol=2e-2, rtol=1e-2)
    batch = split.train[:16]
    plain = tr.EmbeddingDistillTask(teacher, student, sequences, split).loss(batch)
    loss = task.loss(batch)
    assert loss.item() > plain.item()
    loss.backward()
    # the feature terms train every student layer
    assert student.encoder.layer[0].intermediate.dense.weight.grad.abs().sum() > 0
    identity = tr.EmbeddingDistillTask(
        teacher, copy.deepcopy(teacher), sequences, split, hidden_weight=1.0, layer_map=(1, 2, 3, 4)
    )
    assert identity.loss(batch).item() == pytest.approx(0.0, abs=1e-3)


def test_augmentation_makes_new_inputs_from_the_users_tokens():
    rng = np.random.default_rng(3)
    cls, sep = 2, 3
    sequences = [
        np.array([cls, *rng.integers(5, 500, int(n)), sep]) for n in rng.integers(1, 40, 64)
    ]
    sources = np.arange(0, 64, 2)  # only the "training" half may be used
    made = tr.augment_sequences(sequences, sources, 200, np.random.default_rng(0))
    assert len(made) == 200
    source_set = {tuple(sequences[i]) for i in sources}
    pool = set(np.concatenate([sequences[i][1:-1] for i in sources]).tolist())
    crops = 0
    for seq in made:
        assert seq[0] == cls
        assert seq[-1] == sep
        assert tuple(seq) not in source_set  # never a copy of a source
        assert set(seq[1:-1].tolist()) <= pool  # only the sources' own tokens
        crops += not any(len(seq) == len(sequences[i]) for i in sources)
    assert crops > 30
    assert len({tuple(s) for s in made}) > 190  # distinct inputs
    again = tr.augment_sequences(sequences, sources, 200, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(made, again, strict=True))  # seeded
    assert tr.augment_sequences(sequences, sources, 0, np.random.default_rng(0)) == []


def test_augmented_inputs_get_their_own_cached_teacher_outputs(teacher_dir, texts):
    from transformers import AutoTokenizer

    teacher = load_hf_checkpoint(teacher_dir).artifact.torch_model
    sequences = tr.tokenize(texts[:80], AutoTokenizer.from_pretrained(str(teacher_dir)), 32)
    rng = np.random.default_rng(2)  # the tiny vocabulary reads most words as [UNK]: vary ids
    sequences = [np.array([s[0], *rng.integers(5, 40, len(s) - 2), s[-1]]) for s in sequences]
    split = split_holdout(len(sequences), fraction=0.2, min_holdout=16, min_train=64)
    made = tr.augment_sequences(sequences, split.train, 8, np.random.default_rng(1))
    task = tr.EmbeddingDistillTask(
        teacher,
        tr.build_layer_student(teacher, (0, 2)),
        [*sequences, *made],
        split,
        hidden_weight=1.0,
        layer_map=(2, 4),
    )
    for k, seq in enumerate(made):
        ids, mask = tr.pad([seq])
        expected = tr.mean_pool(tr.last_hidden(teacher, ids, mask), mask)[0]
        cached = task.teacher_pooled[len(sequences) + k]
        torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-4)
        assert task.teacher_tokens[len(sequences) + k].shape == (2, len(seq), 64)


@pytest.mark.slow
def test_precision_choice():
    assert tr.resolve_precision("fp32") is None
    assert tr.resolve_precision("bf16") is torch.bfloat16
    assert tr.resolve_precision("auto") is (torch.bfloat16 if tr.fast_bf16_matmul() else None)


def test_eager_attention_is_switched_in_and_restored(teacher_dir, texts):
    from transformers import AutoTokenizer

    model = load_hf_checkpoint(teacher_dir).artifact.torch_model.eval()
    sequences = tr.tokenize(texts[:8], AutoTokenizer.from_pretrained(str(teacher_dir)), 32)
    ids, mask = tr.pad(sequences)
    before = model.config._attn_implementation
    with torch.no_grad():
        reference = tr.last_hidden(model, ids, mask)
        with tr.attention_implementation(model, "eager"):
            assert model.config._attn_implementation == "eager"
            eager = tr.last_hidden(model, ids, mask)
    assert model.config._attn_implementation == before
    torch.testing.assert_close(eager, reference, atol=1e-5, rtol=1e-4)  # the same function


def test_bf16_autocast_runs_the_student_in_bfloat16_with_float32_weights(teacher_dir, texts):
    from transformers import AutoTokenizer

    teacher = load_hf_checkpoint(teacher_dir).artifact.torch_model
    sequences = tr.tokenize(texts[:96], AutoTokenizer.from_pretrained(str(teacher_dir)), 32)
    split = split_holdout(len(sequences), fraction=0.2, min_holdout=16, min_train=64)
    student = tr.build_layer_student(teacher, (0, 2))
    kwargs = {"hidden_weight": 1.0, "layer_map": (2, 4)}
    fp32 = tr.EmbeddingDistillTask(teacher, student, sequences, split, **kwargs)
    bf16 = tr.EmbeddingDistillTask(
        teacher, student, sequences, split, autocast=torch.bfloat16, **kwargs
    )
    seen: list[torch.dtype] = []
    dense = student.encoder.layer[0].output.dense
    hook = dense.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    batch = split.train[:16]
    with tr.attention_implementation(student, "eager"):
        low = bf16.loss(batch)
    full = fp32.loss(batch)
    hook.remove()
    assert seen == [torch.bfloat16, torch.float32]
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(full.item(), rel=0.05)  # same loss, bf16 rounding
    low.backward()
    assert dense.weight.dtype == torch.float32
    assert dense.weight.grad is not None
    assert dense.weight.grad.dtype == torch.float32
    assert dense.weight.grad.abs().sum() > 0
    # the teacher's outputs were cached under the same autocast: bf16, float32 storage, close
    assert bf16.teacher_pooled.dtype == torch.float32
    assert not torch.equal(bf16.teacher_pooled, fp32.teacher_pooled)
    cosine = torch.nn.functional.cosine_similarity(bf16.teacher_pooled, fp32.teacher_pooled)
    assert cosine.min() > 0.999


def test_pass_exports_a_smaller_student(teacher_dir, texts, tmp_path):
    loaded = load_hf_checkpoint(teacher_dir)
    meta = dict(loaded.artifact.meta)
    ctx = PassContext(workdir=tmp_path, batch_size=4, seq_len=32)
    exported = get_pass("export").run(loaded.artifact, ctx).artifact
    teacher = Artifact("onnx", "transformer", onnx_path=exported.onnx_path, meta=exported.meta)
    feeds = tokenize(teacher_dir, texts, 64, meta["input_names"])
    ctx.calibration = {"inputs": batches(feeds, 16)[0], "synthetic": False}
    distill = get_pass(
        "distill", keep_layers=(0, 3), lr=1e-3, max_steps=40, eval_every=10, augment=0.5
    )
    result = distill.run(teacher, ctx)
    report = result.report
    assert report["student"]["layers"] == [0, 3]
    assert result.artifact.onnx_path != teacher.onnx_path
    assert report["student"]["bytes"] < report["teacher"]["bytes"]
    assert teacher.onnx_path.is_file()
    assert report["student"]["parameters"] < report["teacher"]["parameters"]
    assert report["student"]["encoder_flops"] == report["teacher"]["encoder_flops"] // 2
    assert report["training"]["best_fidelity"] > report["training"]["initial_fidelity"]
    assert report["data"] == {"train": 340 + 170, "held_out": 60, "augmented": 170}
    assert report["precision"] == ("bf16" if tr.fast_bf16_matmul() else "fp32")
    assert Path(report["plot"]).is_file()
    assert report["speed"]["speedup"] > 0
    session = ort.InferenceSession(str(result.artifact.onnx_path))
    sample = dict(ctx.calibration["inputs"][0])
    hidden = session.run(None, sample)[0]
    assert hidden.shape == (*sample["input_ids"].shape, 64)
    assert np.isfinite(hidden).all()


def test_pass_refuses_onnx_only_transformers(tmp_path, teacher_dir, texts):
    loaded = load_hf_checkpoint(teacher_dir)
    feeds = tokenize(teacher_dir, texts, 64, loaded.artifact.meta["input_names"])
    ctx = PassContext(workdir=tmp_path)
    ctx.calibration = {"inputs": batches(feeds, 16)[0], "synthetic": False}
    onnx_only = Artifact("onnx", "transformer", onnx_path=tmp_path / "model.onnx", meta={})
    with pytest.raises(PassNotApplicable, match="needs its PyTorch weights"):
        get_pass("distill").call(onnx_only, ctx)


def test_stdlib_docstrings_are_extra_prose_disjoint_from_excluded_text():
    import json
    import textwrap

    from optimizers.distill.data import stdlib_docstring_sentences

    found = stdlib_docstring_sentences(modules=["json", "textwrap"])
    assert len(found) > 20
    assert len(set(found)) == len(found)
    assert any(s in (textwrap.dedent.__doc__ or "") for s in found)  # really the docstrings
    first = found[0]
    assert first in " ".join((json.__doc__ or "").split())
    assert first not in stdlib_docstring_sentences([first], modules=["json", "textwrap"])
