"""The product's typed configuration. Every field is documented here; YAML files in configs/ set them.

Override any field on the command line: ``--embedding.optimizer.lr=0.05``,
``--embedding.tables.movie_id.sharding_type=row_wise``, ``--model.mlp=[64,32]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from models.config import ModelConfig
from trainer.config_base import ConfigError
from trainer.optim.names import (COUNTER_BYTES, COUNTER_FORMS, DEFAULT_LR, EMB_OPTIMIZERS, STEP_RULES, UB_MODES,
                                 UB_ROWS)

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
TRANSFER_MODES = ("baseline", "plus_t", "select", "lexico", "both")
TRANSFER_LOSSES = ("mmd", "cosreg", "frage", "neighbor")
RANKING_LOSSES = ("none", "pairwise", "listwise")


def _choice(where: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}.{name}: {value!r} is not one of {list(allowed)}")


def _number(where: str, name: str, value: float, low: float = -math.inf, *, strict: bool = False,
            high: float = math.inf, allow_inf: bool = False) -> None:
    """``value`` must be a real number (no NaN; inf only with ``allow_inf``) in [low, high] (``strict``:
    greater than ``low``). NaN compares false with everything, so it is named explicitly."""
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ConfigError(f"{where}.{name}: must be a finite number, got {value!r}")
    if (value <= low if strict else value < low) or value > high:
        lo = f"> {low:g}" if strict else f">= {low:g}"
        rng = lo if high == math.inf else f"{lo} and <= {high:g}"
        raise ConfigError(f"{where}.{name}: must be {rng}, got {value!r}")


@dataclass
class DataConfig:
    path: str = "runs/demo/dataset"    # converted dataset directory (holds manifest.json)
    batch_size: int = 1024             # per rank, training
    eval_batch_size: int = 4096        # per rank, evaluation
    shuffle_buffer: int = 16384        # rows shuffled together inside a rank's stream
    prefetch: int = 4                  # batches prepared ahead by the background thread
    features: list[str] = field(default_factory=list)  # sparse features to use; [] = all in manifest
    bucket_feature: str = ""           # feature whose id frequency defines head/torso/tail eval buckets

    def validate(self, where: str) -> None:
        for name in ("batch_size", "eval_batch_size", "shuffle_buffer"):
            _number(where, name, getattr(self, name), 1)
        _number(where, "prefetch", self.prefetch, 0)


@dataclass
class EmbOptimConfig:
    name: str = "exact_sgd"            # one of trainer.optim.names.EMB_OPTIMIZERS
    lr: float | None = None            # None: the optimizer's own default (trainer.optim.names.DEFAULT_LR)
    eps: float = 1e-8
    weight_decay: float = 0.0
    # counter-based (FBGEMM COUNTER_SGD and our cfsgd)
    counter_halflife: float = -1.0     # <0: plain count; 0: always 1; >0: exponential decay half-life (steps)
    counter_form: str = "fbgemm"       # cfsgd step: "fbgemm" lr/sqrt(ub c) | "paper" lr/sqrt(ub c T/t) (ALGORITHMS §1)
    horizon: int = 0                   # T of the paper form in steps; 0 = the run's planned training steps
    adjustment_ub: float = 1.0         # eta = lr / sqrt(ub * c); with ub_mode=table a multiplier of the estimate
    ub_mode: str | None = None         # cfsgd: "table" (ours, per-table online ub; the default) | "fixed" (FBGEMM:
                                       # ub = adjustment_ub). None: "table" for cfsgd, "fixed" for the others
    ub_rows: str = "geometric"         # table ub: a step's rows averaged geometric | arithmetic (docs/ALGORITHMS §1)
    ub_row_floor: bool = True          # table ub: a row's ub is at least its own mean_d(d^2) of the step
    adjustment_iter: int = -1          # warm-up: rowwise Adagrad until this step (<=0: none)
    lr_max: float = math.inf           # cap on the per-row step size (cfsgd only)
    counter_bytes: int = 4             # cfsgd row counter: 4 float32 count | 2, 1 approximate (docs/COMPACT_COUNTERS.md)
    # item-wise lexico (ours only; transfer.mode=lexico/both switch it on for the transfer tables)
    lexico: bool = False
    lexico_alpha: float = 2.0          # phi_i = alpha * min(||g_i||^2, loss_main)
    lexico_lambda_max: float = math.inf  # optional cap on lambda_i (not in the paper: capped rows may break the barrier)
    lexico_h_clip: float = 0.0         # >0: clip ||h_i|| to this multiple of ||g_i|| (docs/ALGORITHMS.md §8)
    lexico_apply_to_all: bool = True   # rows without a transfer gradient: Algorithm 1 (True) or the plain step

    def __post_init__(self) -> None:
        if self.lr is None and self.name in DEFAULT_LR:   # resolved once, so the saved config records it
            self.lr = DEFAULT_LR[self.name]
        if self.ub_mode is None:
            self.ub_mode = "table" if self.name == "cfsgd" else "fixed"

    def validate(self, where: str) -> None:
        _choice(where, "name", self.name, EMB_OPTIMIZERS)
        _number(where, "lr", self.lr, 0, strict=True)
        _number(where, "eps", self.eps, 0)
        _number(where, "weight_decay", self.weight_decay, 0)
        _number(where, "counter_halflife", self.counter_halflife)
        _number(where, "adjustment_ub", self.adjustment_ub, 0, strict=True)
        _number(where, "lr_max", self.lr_max, 0, strict=True, allow_inf=True)
        _number(where, "lexico_alpha", self.lexico_alpha, 0, strict=True)
        _number(where, "lexico_lambda_max", self.lexico_lambda_max, 0, strict=True, allow_inf=True)
        _number(where, "lexico_h_clip", self.lexico_h_clip, 0)
        _choice(where, "counter_form", self.counter_form, COUNTER_FORMS)
        _choice(where, "ub_mode", self.ub_mode, UB_MODES)
        _choice(where, "ub_rows", self.ub_rows, UB_ROWS)
        if self.ub_mode == "table" and self.name != "cfsgd":
            raise ConfigError(f"{where}.ub_mode: 'table' is our cfsgd kernel's option, not {self.name}'s")
        _number(where, "horizon", self.horizon, 0)
        if self.counter_form == "paper" and self.name != "cfsgd":
            raise ConfigError(f"{where}.counter_form: 'paper' is our cfsgd kernel's form, not {self.name}'s")
        _choice(where, "counter_bytes", self.counter_bytes, COUNTER_BYTES)
        if self.counter_bytes != 4:
            if self.name != "cfsgd":
                raise ConfigError(f"{where}.counter_bytes: 2 or 1 is our cfsgd kernel's option, not {self.name}'s")
            if self.counter_halflife >= 0:
                raise ConfigError(f"{where}.counter_bytes={self.counter_bytes} counts plainly: it needs "
                                  f"counter_halflife < 0, not {self.counter_halflife}")
        if self.lexico and self.name not in STEP_RULES:
            raise ConfigError(f"{where}.lexico: needs one of our kernels {list(STEP_RULES)}, not {self.name}")


@dataclass
class TableConfig:
    """Per-table overrides; unset fields fall back to EmbeddingConfig."""
    dim: int | None = None
    sharding_type: str | None = None
    optimizer: EmbOptimConfig | None = None

    def validate(self, where: str) -> None:
        if self.sharding_type is not None:
            _choice(where, "sharding_type", self.sharding_type, SHARDING_TYPES)
        if self.dim is not None:
            _number(where, "dim", self.dim, 1)


@dataclass
class EmbeddingConfig:
    dim: int = 16
    sharding_type: str = "table_wise"
    compute_kernel: str = "fused"      # planner kernel for fused tables (our kernel hooks in under it)
    init_scale: float = 0.0            # >0: uniform(-s, s) init; 0: TorchRec default (sqrt(1/num_embeddings))
    optimizer: EmbOptimConfig = field(default_factory=EmbOptimConfig)
    tables: dict[str, TableConfig] = field(default_factory=dict)
    # planner capacities per device (HBM) and per rank (DDR), GiB; 0 = detected (trainer/sharding.py)
    hbm_cap_gb: float = 0.0
    ddr_cap_gb: float = 0.0

    def validate(self, where: str) -> None:
        _choice(where, "sharding_type", self.sharding_type, SHARDING_TYPES)
        _number(where, "dim", self.dim, 1)
        _number(where, "init_scale", self.init_scale, 0)
        _number(where, "hbm_cap_gb", self.hbm_cap_gb, 0)
        _number(where, "ddr_cap_gb", self.ddr_cap_gb, 0)

    def for_table(self, name: str) -> tuple[int, str, EmbOptimConfig]:
        # a derived table (models/layout.py: movie_id__me1, movie_id__att) without an entry of its own
        # takes its base feature's
        t = self.tables.get(name) or self.tables.get(name.split("__", 1)[0]) or TableConfig()
        return (t.dim or self.dim, t.sharding_type or self.sharding_type, t.optimizer or self.optimizer)


@dataclass
class DenseOptimConfig:
    name: str = "adam"                 # adam | sgd | adagrad
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_grad_norm: float = 100.0      # 0 disables

    def validate(self, where: str) -> None:
        _choice(where, "name", self.name, ("adam", "sgd", "adagrad"))
        _number(where, "lr", self.lr, 0)   # 0 freezes the dense part (a legitimate experiment); < 0 ascends
        _number(where, "weight_decay", self.weight_decay, 0)
        _number(where, "clip_grad_norm", self.clip_grad_norm, 0)


@dataclass
class TrainConfig:
    epochs: int = 2
    max_steps: int = 0                 # >0: stop after this many global steps
    seed: int = 42
    device: str = "auto"               # auto | cpu | cuda (auto: cuda if available)
    log_every: int = 50
    eval_every_epochs: int = 1
    early_stop_patience: int = 0       # evals without valid-AUC improvement before stopping; 0 = off
    pipeline: bool = True              # TrainPipelineSparseDist (overlap input dist and compute)
    threads: int = 0                   # torch intra-op threads per rank; 0 = leave default

    def validate(self, where: str) -> None:
        _choice(where, "device", self.device, ("auto", "cpu", "cuda"))
        _number(where, "epochs", self.epochs, 1)
        _number(where, "log_every", self.log_every, 1)
        _number(where, "eval_every_epochs", self.eval_every_epochs, 1)
        for name in ("max_steps", "early_stop_patience", "threads"):
            _number(where, name, getattr(self, name), 0)


@dataclass
class CheckpointConfig:
    dir: str = ""                      # "" -> <run_dir>/checkpoints
    every_steps: int = 0               # 0: only at epoch ends
    keep: int = 2
    resume: bool = True                # load the latest complete checkpoint when present

    def validate(self, where: str) -> None:
        _number(where, "every_steps", self.every_steps, 0)
        _number(where, "keep", self.keep, 0)   # 0 keeps every checkpoint


@dataclass
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    base_port: int = 9400              # rank r serves on base_port + LOCAL_RANK
    pushgateway: str = ""              # host:port; push end-of-run metrics when set

    def validate(self, where: str) -> None:
        _number(where, "base_port", self.base_port, 1, high=65535)


@dataclass
class TransferConfig:
    # fields that no longer exist: refused with this reason instead of "unknown key"
    REMOVED: ClassVar[dict[str, str]] = {"enabled": "nothing read it; transfer.mode=baseline turns transfer off"}

    mode: str = "baseline"             # one of TRANSFER_MODES
    loss: str = "neighbor"             # one of TRANSFER_LOSSES (neighbor: ours, the default; mmd/cosreg/frage: the paper's)
    features: list[str] = field(default_factory=list)  # features whose table gets the transfer loss
    weight: float = 1e-2               # fixed coefficient for plus_t / select
    # coefficient of the transfer loss in lexico / both (1 = Algorithm 1); 0 = the matched-step control:
    # the lexico rule with h = 0 (lambda_i = alpha min(1, loss/||g_i||^2)), i.e. its step size, no transfer.
    # 0.3: with the cfsgd default, 1.0 cost 0.14 AUC overall on the demo world, 0.3 cost none (within
    # noise, 3 seeds) and kept most of the twins' gain (reports/quality)
    lexico_weight: float = 0.3
    source_frac: float = 0.2           # top 20% ids by count = source domain
    # targets only among the rarest target_frac of the seen ids (1: every non-source id, the paper's T;
    # 0.5: about the tail bucket, so torso ids are not pulled)
    target_frac: float = 1.0
    eta_quantile: float = 0.2          # selective target domain threshold quantile
    frage_lr: float = 0.02
    cosreg_form: str = "batch_mean"    # batch_mean: ||mean unit row||^2 | paper: mean cos over distinct pairs
    # neighbor loss: row j's pull is weighted 1 / (1 + count_j / anchor_count_scale) (train count of its
    # id), a prior that fades as the id's own data grows; 0 = the same pull for every target row
    anchor_count_scale: float = 5.0
    mmd_sigma_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # planted.json of a generated dataset (data.generate): also report metrics on the examples whose
    # data.bucket_feature id is a planted twin / loner / other (eval groups; works in any mode)
    eval_groups: str = ""

    def validate(self, where: str) -> None:
        _choice(where, "mode", self.mode, TRANSFER_MODES)
        _choice(where, "loss", self.loss, TRANSFER_LOSSES)
        _choice(where, "cosreg_form", self.cosreg_form, ("batch_mean", "paper"))
        _number(where, "weight", self.weight, 0)
        _number(where, "lexico_weight", self.lexico_weight, 0)
        _number(where, "source_frac", self.source_frac, 0, strict=True, high=1)
        _number(where, "target_frac", self.target_frac, 0, strict=True, high=1)
        _number(where, "eta_quantile", self.eta_quantile, 0, high=1)
        _number(where, "frage_lr", self.frage_lr, 0, strict=True)
        _number(where, "anchor_count_scale", self.anchor_count_scale, 0)
        for i, scale in enumerate(self.mmd_sigma_scales):
            _number(where, f"mmd_sigma_scales[{i}]", scale, 0, strict=True)


STOCK_OPTIMIZER = "exact_rowwise_adagrad"   # what TorchRec users train with: FBGEMM's fused rowwise Adagrad
METHODS = ("tailrec", "stock")


@dataclass
class DiagnosticsConfig:
    collapse: bool = True              # embedding-collapse diagnostics at each evaluation (trainer/diagnostics.py)
    sample_rows: int = 65536           # column-split tables: seen rows sampled (seeded) to assemble; 0 = all
    tables: list[str] = field(default_factory=list)  # tables to diagnose; [] = every table

    def validate(self, where: str) -> None:
        _number(where, "sample_rows", self.sample_rows, 0)


@dataclass
class LossConfig:
    """loss = BCE + ``weight`` * ranking term over the pairs of one rank's batch (trainer/losses.py)."""
    ranking: str = "none"              # one of RANKING_LOSSES: none | pairwise | listwise
    weight: float = 1.0                # coefficient of the ranking term
    temperature: float = 1.0           # listwise: softmax over logits / temperature

    def validate(self, where: str) -> None:
        _choice(where, "ranking", self.ranking, RANKING_LOSSES)
        _number(where, "weight", self.weight, 0)
        _number(where, "temperature", self.temperature, 0, strict=True)


@dataclass
class Config:
    # tailrec: the config as written (our optimizer and transfer) | stock: the stock TorchRec baseline, one
    # flag away: FBGEMM exact_rowwise_adagrad at its default lr on every table, no transfer (the rest kept)
    method: str = "tailrec"
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    dense_optim: DenseOptimConfig = field(default_factory=DenseOptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def validate(self, where: str) -> None:
        _choice(where, "method", self.method, METHODS)
        if self.method == "stock":
            self.embedding.optimizer = EmbOptimConfig(name=STOCK_OPTIMIZER)
            for t in self.embedding.tables.values():
                t.optimizer = None
            self.transfer.mode = "baseline"


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    from trainer import config_base

    return config_base.load(Config, path, overrides)
