"""The distillation pass's typed, frozen configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DistillConfig:
    """How to build and train a student.

    Student shape: ``keep_layers`` (teacher layer indices the student keeps, transformers;
    default every ``layer_stride``-th layer starting at ``layer_offset``), ``ffn_fraction``
    (share of FFN neurons kept, by weight importance) and ``width_fraction`` (share of CNN
    channels / hidden neurons kept, the most important filters by L1 norm).

    Training: ``temperature`` for the KL term on logits, ``lr`` with ``warmup_steps`` linear
    warm-up then cosine decay to 10% at the end of the time budget or ``max_steps`` (None: until
    the budget or early stopping),
    ``eval_every`` steps between held-out evaluations, ``patience`` evaluations without
    improvement before stopping, ``time_budget_s`` for training (also capped by the job's
    deadline: at most ``budget_share`` of what is left of it).

    Data: ``holdout_fraction`` of the examples is held out (at least ``min_holdout``) and
    at least ``min_train`` must remain; otherwise the pass refuses.
    """

    keep_layers: tuple[int, ...] | None = None
    layer_stride: int = 2
    layer_offset: int = 0
    ffn_fraction: float = 1.0
    width_fraction: float = 0.5
    temperature: float = 2.0
    hidden_weight: float = 2.0
    """Weight of the feature-based term (transformers): 1 - token cosine of each student layer
    against the teacher hidden state ``layer_map`` assigns it (0: pooled embeddings only).
    MiniLM, equal steps (1,200, 8,419 sentences): test cosine 0.9460 at 2 vs 0.9447 at 1;
    fading it out over training instead gave 0.9431."""
    relation_weight: float = 1.0
    """Weight of MiniLM's last-layer self-attention-distribution and value-relation KL terms
    (transformers; 0: off), recomputed from the last layer's query/key/value projections."""
    layer_map: str = "skip"
    """Which teacher state each student layer imitates: ``skip`` (the state handed to the next
    kept layer), ``uniform`` (every n/m-th layer, MiniLM-style) or ``last`` (the last layer's
    tokens only)."""
    lr: float | None = None
    """AdamW peak learning rate; None: 1e-3 for transformers, 3e-3 for CNNs."""
    weight_decay: float = 0.01
    warmup_steps: int = 20
    batch_size: int = 32
    max_steps: int | None = None
    eval_every: int = 25
    max_eval_share: float | None = 0.05
    """Most of the training time held-out evaluations may take (None: evaluate every
    ``eval_every`` steps regardless); an evaluation waits while they have taken more."""
    patience: int = 6
    time_budget_s: float = 600.0
    budget_share: float = 0.6
    finish_reserve_s: float = 30.0
    """Seconds of ``time_budget_s`` (at most 10% of it) kept back from training for the export,
    plot and speed measurement that follow, so the whole pass fits its budget."""
    holdout_fraction: float = 0.15
    min_holdout: int = 16
    min_train: int = 64
    max_seq_len: int = 128
    dropout: bool = False
    """Train the transformer student with its dropout layers active (a regularizer against
    overfitting a small unlabeled set); the teacher's targets are always dropout-free."""
    augment: float = 0.0
    """Augmented training inputs per training example (transformers; 0: none): random spans
    of the user's sequences with a few tokens replaced (``transformer.augment_sequences``),
    their teacher outputs cached with the rest. Enlarges a small unlabeled set; the held-out
    split stays the user's own text."""
    precision: str = "auto"
    """Transformer student training arithmetic: ``fp32``, ``bf16`` (CPU autocast to bfloat16
    for the student's forward; float32 weights, optimizer, losses and evaluation) or ``auto``
    (bf16 where the CPU has AMX tiles, else fp32). On this project's AMX CPU a bf16 step takes
    about half the time of an fp32 one, so the same budget trains about twice as many steps."""
    allow_synthetic: bool = False
    seed: int = 0
    threads: int = -1
    """PyTorch intra-op threads while distilling: -1 (default) uses the cores the rest of the
    machine leaves idle (a 0.5 s sample of /proc/stat, else the 1-minute load average; at least
    one), 0 leaves torch's setting. A shared CPU (the server,
    other jobs) makes multi-threaded training stall: measured 25x slower per step with 2
    threads on a loaded 2-core machine, so a busy machine gets one thread."""

    def learning_rate(self, family: str) -> float:
        """The configured ``lr``, or the family's default."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if family == "transformer" else 3e-3

    def __post_init__(self) -> None:
        checks = [
            (self.layer_stride >= 1, "layer_stride must be >= 1"),
            (self.layer_offset >= 0, "layer_offset must be >= 0"),
            (0.0 < self.ffn_fraction <= 1.0, "ffn_fraction must be in (0, 1]"),
            (0.0 < self.width_fraction <= 1.0, "width_fraction must be in (0, 1]"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.hidden_weight >= 0, "hidden_weight must be >= 0"),
            (self.relation_weight >= 0, "relation_weight must be >= 0"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (
                self.max_eval_share is None or 0 < self.max_eval_share <= 1,
                "max_eval_share must be in (0, 1] or None",
            ),
            (self.patience >= 1, "patience must be >= 1"),
            (self.time_budget_s > 0, "time_budget_s must be > 0"),
            (0.0 < self.budget_share <= 1.0, "budget_share must be in (0, 1]"),
            (self.finish_reserve_s >= 0, "finish_reserve_s must be >= 0"),
            (0.0 < self.holdout_fraction < 1.0, "holdout_fraction must be in (0, 1)"),
            (self.min_holdout >= 1, "min_holdout must be >= 1"),
            (self.min_train >= 1, "min_train must be >= 1"),
            (self.max_seq_len >= 2, "max_seq_len must be >= 2"),
            (self.augment >= 0, "augment must be >= 0"),
            (self.threads >= -1, "threads must be >= -1 (-1: free cores, 0: torch's)"),
            (self.layer_map in ("skip", "uniform", "last"), "layer_map: skip, uniform or last"),
            (self.precision in ("auto", "fp32", "bf16"), "precision: auto, fp32 or bf16"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DistillConfig: {message}")
        if self.keep_layers is not None:
            if not self.keep_layers or any(i < 0 for i in self.keep_layers):
                raise ValueError("DistillConfig: keep_layers must be non-empty layer indices >= 0")
            if list(self.keep_layers) != sorted(set(self.keep_layers)):
                raise ValueError("DistillConfig: keep_layers must be strictly increasing")
