"""The ``distill`` pass: build a smaller student from the teacher and train it on the user's
unlabeled calibration data to reproduce the teacher's outputs.

Transformers (a Hugging Face encoder): keep every k-th layer and optionally the most important
FFN neurons, train on mean-pooled embeddings, export to ONNX. CNNs/MLPs (an ONNX graph): keep
the most important filters of each layer, train with KL divergence at temperature T on the
logits, write the weights back into the graph. The pass refuses (``PassNotApplicable``, the
reason lands in the job report) without user data or with too little of it to hold out a
validation split. Candidate chains run only when the request's ``allow`` names ``distill``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from optimizers.distill.config import DistillConfig
from optimizers.distill.data import NotEnoughData, Split, split_holdout, stack_inputs
from optimizers.passes.base import Artifact, Pass, PassContext, PassNotApplicable, PassResult
from optimizers.registry import register_chains, register_pass


def finish_reserve(config: DistillConfig) -> float:
    """Seconds of the pass's budget kept back from training for what follows it (ONNX export,
    the curve plot, the speed measurement: ~15-20 s for MiniLM), so the whole pass, not only
    its training loop, fits ``time_budget_s``."""
    return min(config.finish_reserve_s, 0.1 * config.time_budget_s)


def _training_budget(config: DistillConfig, ctx: PassContext, started: float) -> float:
    """Seconds left for training: the pass's own budget less the finishing reserve, capped by a
    share of the job's."""
    budget = config.time_budget_s - finish_reserve(config) - (time.monotonic() - started)
    if ctx.deadline is not None:
        budget = min(budget, config.budget_share * (ctx.deadline - time.monotonic()))
    if budget <= 1.0:
        raise PassNotApplicable(
            f"no time left to train a student ({budget:.1f} s of the budget remain); "
            "raise the job's time_budget_s"
        )
    return budget


def _train(
    task: Any, cfg: DistillConfig, family: str, ctx: PassContext, started: float, metric: str
) -> Any:
    """Run the shared training loop with the config's schedule, the pass's remaining budget,
    cancellation and progress in ``metric``."""
    from optimizers.distill.trainer import train

    return train(
        task,
        lr=cfg.learning_rate(family),
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        eval_every=cfg.eval_every,
        patience=cfg.patience,
        budget_s=_training_budget(cfg, ctx, started),
        max_steps=cfg.max_steps,
        seed=cfg.seed,
        check_cancelled=ctx.check_cancelled,
        progress=_progress(ctx, metric),
        max_eval_share=cfg.max_eval_share,
    )


def _progress(ctx: PassContext, metric: str):
    def report(event: dict[str, Any]) -> None:
        ctx.report_progress(
            f"distill: step {event['step']}, loss {event['loss']:.4f}, "
            f"held-out {metric} {event['fidelity']:.4f}",
            event["fraction"],
        )

    return report


def _split(n: int, config: DistillConfig) -> Split:
    try:
        return split_holdout(
            n,
            fraction=config.holdout_fraction,
            min_holdout=config.min_holdout,
            min_train=config.min_train,
            seed=config.seed,
        )
    except NotEnoughData as exc:
        raise PassNotApplicable(f"{exc}; upload more calibration data") from exc


@register_pass
class Distill(Pass):
    """Train a smaller student (fewer layers / narrower) against the teacher's outputs."""

    name = "distill"
    applies_to = frozenset({"transformer", "cnn"})
    helps = frozenset({"cpu", "cuda", "tensorrt"})
    input_kind = "onnx"
    opt_in: ClassVar[bool] = True
    """Runs minutes and needs user data: candidate chains with it run only when the request's
    ``allow`` names it (``optimizers.chains.is_opt_in``)."""
    Config = DistillConfig

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        if artifact.kind != "onnx":
            raise PassNotApplicable(f"distill runs on the exported ONNX model, got {artifact.kind}")
        if artifact.family not in self.applies_to:
            raise PassNotApplicable(
                f"distill applies to transformer and cnn, not {artifact.family}"
            )
        if artifact.kind == "onnx" and artifact.meta.get("distilled"):
            raise PassNotApplicable("the model is already a distilled student")
        calibration = ctx.calibration or {}
        if calibration.get("synthetic") and not self.config.allow_synthetic:
            raise PassNotApplicable(
                "distillation trains on the user's unlabeled data and none was uploaded "
                f"(only {calibration.get('source') or 'built-in data'}); upload calibration "
                "data (text lines or an .npz of input tensors)"
            )
        batches = calibration.get("inputs") or []
        count = sum(len(next(iter(b.values()))) for b in batches if b)
        _split(count, self.config)  # refuses with the reason when the data is too small

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        from optimizers.distill.trainer import torch_threads

        with torch_threads(self.config.threads):
            if artifact.family == "transformer":
                return self._transformer(artifact, ctx)
            return self._cnn(artifact, ctx)

    # -- transformers ------------------------------------------------------------------
    def _transformer(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        import torch

        from optimizers.distill import transformer as tr
        from optimizers.registry import get_pass

        cfg = self.config
        started = time.monotonic()
        teacher = _teacher_module(artifact)
        sequences = []
        for batch in ctx.calibration.get("inputs") or []:
            if "input_ids" not in batch:
                raise PassNotApplicable("calibration batches have no input_ids")
            sequences += [s[: cfg.max_seq_len] for s in tr.sequences_from_arrays(batch)]
        split = _split(len(sequences), cfg)
        augmented = tr.augment_sequences(
            sequences,
            split.train,
            round(cfg.augment * len(split.train)),
            np.random.default_rng(cfg.seed),
        )
        if augmented:
            extra = np.arange(len(sequences), len(sequences) + len(augmented))
            split = Split(train=np.concatenate([split.train, extra]), holdout=split.holdout)
            sequences += augmented
        n_layers = len(getattr(*tr.encoder_layers(teacher)))
        keep = cfg.keep_layers or tr.default_keep_layers(
            n_layers, cfg.layer_stride, cfg.layer_offset
        )
        if len(keep) >= n_layers and cfg.ffn_fraction >= 1.0:
            raise PassNotApplicable(f"the student would keep all {n_layers} layers")
        student = tr.build_layer_student(teacher, keep, cfg.ffn_fraction)
        tr.freeze_embeddings(student)
        autocast = tr.resolve_precision(cfg.precision)
        # the relation terms need the last layer's Q/K/V projections; other layouts train without
        relation_weight = cfg.relation_weight if tr.qkv_projections(student) else 0.0
        torch.manual_seed(cfg.seed)
        ctx.report_progress("distill: caching the teacher's outputs", 0.0)
        layer_map = (
            None if cfg.layer_map == "last" else tr.layer_targets(keep, n_layers, cfg.layer_map)
        )
        task = tr.EmbeddingDistillTask(
            teacher,
            student,
            sequences,
            split,
            batch_size=cfg.batch_size,
            hidden_weight=cfg.hidden_weight,
            layer_map=layer_map,
            dropout=cfg.dropout,
            relation_weight=relation_weight,
            autocast=autocast,
        )
        cache_s = time.monotonic() - started
        with tr.attention_implementation(student, "eager" if autocast else None):
            log = _train(task, cfg, artifact.family, ctx, started, "cosine")
        meta = {k: v for k, v in artifact.meta.items() if k != "output_name"}
        exporter = meta.get("exporter") if meta.get("exporter") in ("dynamo", "legacy") else "auto"
        own = dataclasses.replace(ctx, workdir=ctx.scratch("distill"))  # never the teacher's
        exported = get_pass("export", exporter=exporter).run(
            Artifact("torch", "transformer", torch_model=student, meta=meta), own, ["distill"]
        )
        out = exported.artifact
        out.meta.update(distilled=True, num_layers=len(keep))
        out_dir = ctx.scratch("distill")
        report = {
            "student": {
                "layers": list(keep),
                "teacher_layers": n_layers,
                "ffn_width": int(student.config.intermediate_size),
                "parameters": tr.count_parameters(student),
                "encoder_flops": tr.encoder_flops(student.config, ctx.seq_len),
                "bytes": out.size_bytes(),
            },
            "teacher": {
                "parameters": tr.count_parameters(teacher),
                "encoder_flops": tr.encoder_flops(teacher.config, ctx.seq_len),
                "bytes": artifact.size_bytes(),
            },
            "flops_seq_len": ctx.seq_len,
            "metric": "cosine of mean-pooled embeddings",
            "loss": {
                "pooled": "1 - cosine + MSE / mean square of the teacher's pooled embeddings",
                "feature_weight": cfg.hidden_weight,
                "relation_weight": relation_weight,
                "teacher_states": list(layer_map or [n_layers]) if cfg.hidden_weight else [],
            },
            "dropout": cfg.dropout,
            "precision": "bf16" if autocast else "fp32",
            "torch_threads": torch.get_num_threads(),
            "data": {
                "train": len(split.train),
                "held_out": len(split.holdout),
                "augmented": len(augmented),
            },
            "teacher_cache_seconds": round(cache_s, 2),
            "training": log.as_dict(),
            "export": exported.report,
        }
        return self._finish(artifact, out, report, log, ctx, out_dir, "cosine", started)

    # -- CNNs / MLPs ---------------------------------------------------------------------
    def _cnn(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        import onnx
        import torch

        from optimizers.distill import cnn
        from optimizers.distill.onnx_module import OnnxModule, UnsupportedGraph
        from optimizers.onnxutil import make_session, save_model

        cfg = self.config
        started = time.monotonic()
        teacher_model = onnx.load(str(artifact.onnx_path))
        session = make_session(artifact.onnx_path, "cpu")
        input_names = [i.name for i in session.get_inputs()]
        if len(input_names) != 1:
            raise PassNotApplicable(f"CNN distillation needs one graph input, got {input_names}")
        data = stack_inputs(ctx.calibration.get("inputs") or [])
        if input_names[0] not in data:
            raise PassNotApplicable(f"calibration has no input {input_names[0]!r}")
        inputs = np.ascontiguousarray(data[input_names[0]], dtype=np.float32)
        split = _split(len(inputs), cfg)
        logits = np.concatenate(
            [
                session.run(None, {input_names[0]: inputs[i : i + 256]})[0]
                for i in range(0, len(inputs), 256)
            ]
        )
        if logits.ndim != 2 or logits.dtype.kind != "f":
            raise PassNotApplicable(
                f"the first output must be [batch, classes] logits, got "
                f"{logits.shape} {logits.dtype}"
            )
        student_model, narrowed = cnn.narrow(teacher_model, cfg.width_fraction)
        if not narrowed:
            raise PassNotApplicable("no layer of this graph can be narrowed safely")
        try:
            student = OnnxModule(student_model)
        except UnsupportedGraph as exc:
            raise PassNotApplicable(f"cannot train this graph: {exc}") from exc
        torch.manual_seed(cfg.seed)
        task = cnn.LogitDistillTask(
            student, inputs, logits, split, temperature=cfg.temperature, batch_size=cfg.batch_size
        )
        log = _train(task, cfg, artifact.family, ctx, started, "top-1 agreement")
        out_dir = ctx.scratch("distill")
        trained = student.to_onnx()
        path = save_model(trained, out_dir / "model.onnx")
        out = artifact.with_onnx(path, distilled=True)
        report = {
            "student": {
                "width_fraction": cfg.width_fraction,
                "layers": [vars(layer) for layer in narrowed],
                "parameters": cnn.count_parameters(trained),
                "flops": cnn.graph_flops(trained),
                "bytes": out.size_bytes(),
            },
            "teacher": {
                "parameters": cnn.count_parameters(teacher_model),
                "flops": cnn.graph_flops(teacher_model),
                "bytes": artifact.size_bytes(),
            },
            "metric": "top-1 agreement with the teacher",
            "data": {"train": len(split.train), "held_out": len(split.holdout)},
            "training": log.as_dict(),
        }
        feeds = {input_names[0]: np.resize(inputs, (ctx.batch_size, *inputs.shape[1:]))}
        return self._finish(
            artifact, out, report, log, ctx, out_dir, "top-1 agreement", started, feeds
        )

    def _finish(
        self,
        teacher: Artifact,
        student: Artifact,
        report: dict[str, Any],
        log: Any,
        ctx: PassContext,
        out_dir: Path,
        metric: str,
        started: float,
        feeds: dict[str, np.ndarray] | None = None,
    ) -> PassResult:
        from optimizers.distill.report import plot_curve, speed_vs_teacher

        report["size_ratio"] = report["student"]["parameters"] / report["teacher"]["parameters"]
        try:
            report["plot"] = str(
                plot_curve(
                    log.curve,
                    log.losses,
                    out_dir / "distill_curve.png",
                    metric=metric,
                    title=f"distilled student: held-out {metric}",
                )
            )
        except Exception as exc:  # a plotting problem must not lose the student
            report["plot_error"] = f"{type(exc).__name__}: {exc}"
        if feeds is None:
            from optimizers.loaders import transformer_example

            feeds = transformer_example(teacher.meta, ctx.batch_size, ctx.seq_len, seed=7)
        report["speed"] = speed_vs_teacher(teacher.onnx_path, student.onnx_path, feeds, ctx.target)
        report["pass_seconds"] = round(time.monotonic() - started, 2)
        report["time_budget_s"] = self.config.time_budget_s
        return PassResult(student, True, report)


def _teacher_module(artifact: Artifact) -> Any:
    """The teacher as a PyTorch encoder: the artifact's own, else its checkpoint folder's."""
    from optimizers.distill.transformer import encoder_layers

    model = artifact.torch_model
    if model is None:
        for key in ("checkpoint_dir", "source_dir", "tokenizer_dir"):
            folder = artifact.meta.get(key)
            if folder and (Path(folder) / "model.safetensors").is_file():
                from optimizers.loaders import load_hf_checkpoint

                model = load_hf_checkpoint(Path(folder)).artifact.torch_model
                break
    if model is None:
        raise PassNotApplicable(
            "distilling a transformer needs its PyTorch weights: upload the Hugging Face "
            "checkpoint (config.json + model.safetensors), not an ONNX file"
        )
    try:
        encoder_layers(model)
    except ValueError as exc:
        raise PassNotApplicable(str(exc)) from exc
    return model


register_chains(
    "transformer",
    [
        ["distill", "ort_transformer_optimize"],
        ["distill", "ort_transformer_optimize", "quantize_dynamic"],
    ],
)
register_chains("cnn", [["distill", "ort_graph_optimize"], ["distill", "cnn_static_int8"]])
