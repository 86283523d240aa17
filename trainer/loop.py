"""The training service: build (model, sharding, optimizers, loaders), train, evaluate, checkpoint.

Model selection happens on ``valid``; the reported numbers are ``test`` at the best-valid evaluation.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.loader import ParquetLoader
from data.manifest import load_manifest
from models import build_model
from models.layout import base_feature
from trainer import config_base
from trainer.checkpoint import Checkpointer
from trainer.config import Config, EmbeddingConfig
from trainer.config_base import ConfigError
from trainer.errors import RunError, TrainingDiverged
from trainer.health import Heartbeat
from trainer.logs import show_progress
from trainer.dist import DistEnv
from trainer.evaluation import evaluate
from trainer.dense_optimizer import build_dense_optimizer
from trainer.diagnostics import CollapseMonitor
from trainer.results import PROGRESS, append_progress
from trainer.pipeline import PinnedBatches, TimedIterator, make_driver
from trainer.sharding import kernel_stats, load_ub_state, set_optimizer_step, shard_model, ub_state
from trainer import transfer_wiring
from trainer.train_module import TrainModule
from trainer import tables
from trainer.losses import RankingBCELoss

log = logging.getLogger("tailrec.train")


@dataclass
class TrainState:
    epoch: int = 0               # current epoch (0-based)
    step: int = 0                # global optimizer steps done
    step_in_epoch: int = 0       # batches of `epoch` already trained (per rank)
    best_valid_auc: float = -math.inf
    best: dict = field(default_factory=dict)      # {"epoch", "step", "valid", "test"} at best valid AUC
    bad_evals: int = 0
    history: list = field(default_factory=list)   # one entry per evaluation
    train_seconds: float = 0.0   # wall time inside training steps (excludes eval and checkpoints)
    done: bool = False           # early stopping fired (max_steps is not persisted: a resumed run may go further)


class LossWatch:
    """Remembers, on the device, the first step whose loss was NaN or inf; ``check`` (a collective: call
    it on every rank at the same point) reads it, so the step path never waits on the host for it."""

    NONE = 2**62

    def __init__(self, device: torch.device):
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        self.first = torch.where(torch.isfinite(loss.detach()).all(), self.first, self.first.clamp(max=step))

    def check(self, where: str) -> None:
        first = self.first.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first)
        if step != self.NONE:
            raise TrainingDiverged(
                f"the training loss became NaN or inf at step {step} (found {where}); stopped before writing "
                "a checkpoint of these weights. Lower embedding.optimizer.lr or dense_optim.lr, or check the "
                "input data; the last complete checkpoint (if any) is unchanged.")


def _check_feature_names(cfg: Config, features: list[str], in_dataset: list[str]) -> None:
    """Names in the config that must be features of this dataset (a typo would be silently ignored)."""
    for f in cfg.data.features:
        if f not in in_dataset:
            raise ConfigError(f"data.features: {f!r} is not a feature of {cfg.data.path} ({in_dataset})")
    for name in cfg.embedding.tables:   # derived tables (movie_id__att, models/layout.py): checked by the layout
        if name not in features and base_feature(name) not in features:
            raise ConfigError(f"embedding.tables.{name}: no such feature in this run ({features})")
    if cfg.data.bucket_feature and cfg.data.bucket_feature not in features:
        raise ConfigError(f"data.bucket_feature: {cfg.data.bucket_feature!r} is not a feature of this run "
                          f"({features})")


def planned_steps(cfg: Config, batches_per_epoch: int) -> int:
    """Global steps this run will train: epochs x batches per epoch (per rank), or max_steps if fewer."""
    total = cfg.train.epochs * batches_per_epoch
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def fill_horizon(cfg: Config, steps: int) -> None:
    """The paper form of CF-SGD needs its horizon T: unset (0) means this run's planned steps. Filled in
    the config itself, so the saved config.yaml records the T the run used."""
    opts = [cfg.embedding.optimizer] + [t.optimizer for t in cfg.embedding.tables.values() if t.optimizer]
    for opt in opts:
        if opt.counter_form == "paper" and opt.horizon == 0:
            opt.horizon = max(1, steps)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, metrics=None):
        self.cfg, self.env, self.metrics = cfg, env, metrics
        self.run_dir = Path(cfg.run_dir)
        self.manifest = load_manifest(cfg.data.path)
        self.features = cfg.data.features or [f.name for f in self.manifest.sparse_features]
        _check_feature_names(cfg, self.features, [f.name for f in self.manifest.sparse_features])
        transfer_wiring.prepare_config(cfg)   # lexico on for transfer tables in lexico/both modes
        self.loaders = {s: self._loader(s) for s in ("train", "valid", "test")}
        fill_horizon(cfg, planned_steps(cfg, len(self.loaders["train"])))
        self.layout = tables.resolve_layout(cfg, self.manifest, self.features)
        self.tables = tables.build_tables(cfg, self.manifest, self.layout)
        model = build_model(cfg.model, self.tables, num_dense=len(self.manifest.dense_features),
                            feature_names=list(self.layout.head_features), device="meta")
        train_module = TrainModule(model, RankingBCELoss(cfg.loss.ranking, cfg.loss.weight, cfg.loss.temperature))
        sharded = shard_model(train_module, cfg.embedding, self.tables, dist.group.WORLD, env.device)
        self.dmp, self.plan_text = sharded.dmp, sharded.plan_text
        self.transfer = transfer_wiring.build_runtime(cfg, self.tables, env.device)  # None: baseline
        if self.transfer:
            self.transfer.attach(self.dmp)
            train_module.transfer.set_runtime(self.transfer)
        dense_emb_lr = {n: cfg.embedding.for_table(n.split("embedding_bags.")[1].rsplit(".", 1)[0])[2].lr
                        for n, _ in sharded.dense_emb_params}   # dense_adam tables: torch Adam at their lr
        self.optimizer = build_dense_optimizer(self.dmp, cfg.dense_optim, dense_emb_lr)
        if tables.needs_views(self.layout, self.features):   # derived keys (multi-embedding sets, history positions)
            self.loaders = {s: tables.DerivedBatches(ld, self.layout) for s, ld in self.loaders.items()}
        if self.transfer:  # shadow features in every batch (empty outside training)
            self.loaders = {s: self.transfer.wrap(ld, s == "train") for s, ld in self.loaders.items()}
        self.bucket_of_id = self._buckets()
        dg = cfg.diagnostics
        self.collapse = (CollapseMonitor.from_layout(self.layout, cfg.data.path, dg.tables, env.device, dg.sample_rows,
                                                     cfg.train.seed) if dg.collapse else None)
        groups = transfer_wiring.eval_groups(cfg)
        self.group_of_id, self.group_names = groups if groups is not None else (None, ())
        if self.metrics and self.group_names:
            self.metrics.allow_groups(self.group_names)
        ck_dir = cfg.checkpoint.dir or str(self.run_dir / "checkpoints")
        self.checkpointer = Checkpointer(ck_dir, env.rank, cfg.checkpoint.keep)
        self.state = TrainState()
        self.table_lr = {t.name: cfg.embedding.for_table(t.name)[2].lr for t in self.tables}
        self.loss_watch = LossWatch(env.device)
        self.heartbeat = Heartbeat(env.local_rank)
        self.heartbeat.beat("built")

    def _loader(self, split: str) -> ParquetLoader:
        d, train = self.cfg.data, split == "train"
        return ParquetLoader(d.path, split, d.batch_size if train else d.eval_batch_size,
                             rank=self.env.rank, world_size=self.env.world_size, seed=self.cfg.train.seed,
                             shuffle=train, drop_last=train, features=self.features,
                             shuffle_buffer=d.shuffle_buffer, prefetch=d.prefetch)

    def _buckets(self) -> np.ndarray | None:
        if not self.cfg.data.bucket_feature:
            return None
        from data.stats import bucket_of

        return bucket_of(self.cfg.data.path, self.cfg.data.bucket_feature)

    # ---------------------------------------------------------------- checkpoints
    def _app_state(self) -> dict:
        st = {"model": self.dmp.state_dict(), "dense_optim": self.optimizer.state_dict(),
              "fused_optim": self.dmp.fused_optimizer.state_dict()}
        if self.transfer and self.transfer.app_state():
            st["transfer"] = self.transfer.app_state()   # FRAGE discriminators
        return st

    def _sync_replicated_buffers(self) -> None:
        """BatchNorm running stats are per rank (DMP wraps DDP with broadcast_buffers=False) and DCP
        saves one replica's copy, not necessarily rank 0's. Before eval and checkpoints every rank takes
        rank 0's: eval then uses one set of statistics on every world size, and training is unaffected
        (train-mode BatchNorm normalises with batch statistics; rank 0's own buffers never change here,
        so a resumed run stays bit-identical to an uninterrupted one)."""
        if self.env.world_size > 1:
            for _, buf in self.dmp.named_buffers():
                if type(buf) is torch.Tensor:
                    dist.broadcast(buf, src=0)

    def save_checkpoint(self) -> None:
        self.loss_watch.check(f"before the checkpoint of step {self.state.step}")
        self._sync_replicated_buffers()
        meta = asdict(self.state) | {"world_size": self.env.world_size, "config": config_base.to_dict(self.cfg)}
        if self.transfer:   # transfer statistics since the last evaluation, so a resume reports the same means
            meta["transfer_stats"] = self.transfer.fold_for_checkpoint(self.env.rank)
        meta["ub_state"] = ub_state(self.dmp)   # cfsgd's per-table estimates, by shard (resharding-safe; collective)
        dur = self.checkpointer.save(self.state.step, self._app_state(), meta)
        self.heartbeat.beat(f"checkpoint {self.state.step}")
        if self.metrics:
            self.metrics.on_checkpoint(dur, time.time())
        log.info("checkpoint step %d saved in %.2fs", self.state.step, dur)

    def maybe_resume(self) -> bool:
        """Load the newest usable checkpoint (a damaged newest one falls back to the previous)."""
        if not self.cfg.checkpoint.resume or self.checkpointer.latest() is None:
            if self.env.is_main:   # a fresh run: progress lines of an earlier run in this dir do not apply
                (self.run_dir / PROGRESS).unlink(missing_ok=True)
            return False
        path = self.load_checkpoint()
        self._refuse_finished_run(path)
        return True

    def _refuse_finished_run(self, path: Path) -> None:
        """Relaunching a run that already finished would train 0 steps and report the old numbers as a
        new success: say so instead. (A finished checkpoint without results.json, i.e. a crash between
        the last checkpoint and the results, is completed normally.)"""
        st, tc = self.state, self.cfg.train
        finished = st.done or st.epoch >= tc.epochs or (tc.max_steps and st.step >= tc.max_steps)
        results = self.run_dir / "results.json"
        if finished and results.exists():
            raise RunError(
                f"{self.run_dir} holds a finished run (checkpoint {path.name}: epoch {st.epoch} of {tc.epochs}, "
                f"step {st.step}); its results are in {results}. To train again from scratch use "
                f"--checkpoint.resume=false (replaces its checkpoints) or a new --run_dir; to train longer "
                f"raise --train.epochs / --train.max_steps.")

    def _check_counter_widths(self, path: Path | None) -> None:
        """A CF-SGD counter saved as a float32 count cannot be read as an approximate counter's level (or
        back): DCP would copy the numbers across dtypes, silently wrong. Refuse before anything loads."""
        path = path or self.checkpointer.latest()
        try:
            saved = json.loads((path / "trainer_state.json").read_text())["config"]["embedding"]
            saved_emb = config_base.from_dict(EmbeddingConfig, saved, "checkpoint config.embedding")
        except (OSError, KeyError, TypeError, ValueError, ConfigError):
            return   # unreadable: the load itself reports it (or falls back to an older checkpoint)
        for t in self.tables:
            was, now = saved_emb.for_table(t.name)[2], self.cfg.embedding.for_table(t.name)[2]
            if was.name == now.name == "cfsgd" and was.counter_bytes != now.counter_bytes:
                raise RunError(f"checkpoint {path} trained table {t.name} with embedding counter_bytes="
                               f"{was.counter_bytes}, this run asks for {now.counter_bytes}: the counters do not "
                               f"convert. Resume with the same counter_bytes, or start a new --run_dir.")

    def load_checkpoint(self, path: Path | None = None) -> Path:
        """Load ``path``, or (None) the newest usable checkpoint; returns the path loaded."""
        self._check_counter_widths(path)
        self.optimizer.init_state()  # materialise Adam state so DCP can load into it
        st = self._app_state()
        if path is None:
            path, meta = self.checkpointer.load_latest(st)
        else:
            meta = self.checkpointer.load(path, st)
        self.dmp.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["dense_optim"])
        self.dmp.fused_optimizer.load_state_dict(st["fused_optim"])
        if "transfer" in st:
            self.transfer.load_app_state(st["transfer"])
        saved_world = meta.pop("world_size")
        meta.pop("config", None)
        stats = meta.pop("transfer_stats", None)
        if self.transfer and stats is not None:
            self.transfer.load_fold(stats, self.env.rank)
        approx = load_ub_state(self.dmp, meta.pop("ub_state", None) or {})
        if approx:
            log.warning("%d table shard(s) were sharded differently when saved: their CF-SGD gradient-scale "
                        "estimate starts from the mean of the saved shards' estimates", approx)
        self.state = TrainState(**meta)
        if saved_world != self.env.world_size:  # same examples consumed, other per-rank batch count
            self.state.step_in_epoch = self.state.step_in_epoch * saved_world // self.env.world_size
            torch.manual_seed(self.cfg.train.seed * 1000 + self.env.rank + self.state.step)
        set_optimizer_step(self.dmp, self.state.step)
        log.info("loaded %s: %d epochs completed, step %d (saved by %d ranks)", path, self.state.epoch, self.state.step,
                 saved_world)
        return path

    # ---------------------------------------------------------------- training
    def train(self) -> dict:
        cfg = self.cfg.train
        while not self.state.done and self.state.epoch < cfg.epochs:
            if not self._train_epoch():     # stopped by max_steps: checkpoint where we are
                self.save_checkpoint()
                break
            self.state.epoch += 1
            self.state.step_in_epoch = 0
            if self.state.epoch % cfg.eval_every_epochs == 0 or self.state.epoch == cfg.epochs:
                self._evaluate_and_select()
            self.save_checkpoint()
        if not self.state.history or self.state.history[-1]["step"] != self.state.step:
            self._evaluate_and_select()
        return self.results()

    def _train_epoch(self) -> bool:
        """Returns True when the epoch ran to its end (False: stopped by max_steps)."""
        loader = self.loaders["train"]
        loader.set_epoch(self.state.epoch)
        if self.state.step_in_epoch:
            loader.load_state_dict({"epoch": self.state.epoch, "batches_yielded": self.state.step_in_epoch})
        it = TimedIterator(PinnedBatches(iter(loader), self.env.device))
        driver = make_driver(self.cfg.train.pipeline, self.dmp, self.optimizer, self.env.device)
        set_optimizer_step(self.dmp, self.state.step)
        self.dmp.train()
        t0, s0 = time.perf_counter(), self.state.step
        completed = self._run_steps(driver, it, len(loader))
        driver.detach()
        self.state.train_seconds += time.perf_counter() - t0
        # epochs are counted from 1 in logs, as in results.json ("epoch": epochs completed at that point)
        log.info("epoch %d: %d steps in %.1fs (%.1f ms/step)", self.state.epoch + 1, self.state.step - s0,
                 time.perf_counter() - t0, 1000 * (time.perf_counter() - t0) / max(1, self.state.step - s0))
        return completed

    def _run_steps(self, driver, it: TimedIterator, total: int) -> bool:
        cfg, ck = self.cfg.train, self.cfg.checkpoint
        bar = _progress(show_progress(self.env.is_main), total, self.state.step_in_epoch,
                        f"epoch {self.state.epoch + 1}/{cfg.epochs}")
        t_last, wait_last, first, last_loss = time.perf_counter(), 0.0, True, math.nan
        while True:
            if self.state.step_in_epoch >= total:  # epoch complete (also when it ends exactly at max_steps)
                bar.close()
                return True
            if cfg.max_steps and self.state.step >= cfg.max_steps:
                bar.close()
                return False
            try:
                loss, logits, labels = driver.progress(it)
            except StopIteration:
                bar.close()
                return True
            self.state.step += 1
            self.state.step_in_epoch += 1
            self.loss_watch.observe(loss, self.state.step)
            if self.transfer:
                # FRAGE D step; transfer/lambda statistics read at log steps only (a read waits for the device)
                self.transfer.after_step(self.state.step, stats_every=self.cfg.train.log_every)
            now = time.perf_counter()
            log_step = self.state.step % cfg.log_every == 0
            if log_step or first:
                # the only host read of the loss: every log_every steps (and once per call for the gauge),
                # never per step, so the device queue is not drained each step
                last_loss = float(loss)
            if self.metrics:
                # per-table lrs are constant: set their gauges on the first step of each call, not every step
                self.metrics.on_step(int(labels.numel()), now - t_last, it.wait_s - wait_last, last_loss,
                                     lr=self.table_lr if first else None)
            first = False
            t_last, wait_last = now, it.wait_s
            bar.update(1)
            if log_step:
                self.loss_watch.check(f"at the log step {self.state.step}")
                self.heartbeat.beat(f"step {self.state.step}")
                bar.set_postfix(loss=f"{last_loss:.4f}")
                self._export_optimizer_stats()
            if ck.every_steps and self.state.step % ck.every_steps == 0:
                self.save_checkpoint()  # weights reflect exactly `step` batches; in-flight ones are not counted

    def _export_optimizer_stats(self) -> None:
        """Memory and, for our kernels, counter / lambda statistics of the last step (local shards)."""
        if not self.metrics:
            return
        self.metrics.update_memory()
        for table, st in kernel_stats(self.dmp).items():
            counters = {k[len("counter_"):]: v for k, v in st.items() if k.startswith("counter_")}
            lam = {k[len("lambda_"):]: v for k, v in st.items() if k.startswith("lambda_")}
            self.metrics.on_optimizer_stats(table, self.cfg.embedding.for_table(table)[2].name,
                                            counters or None, lam or None)

    # ---------------------------------------------------------------- evaluation
    def evaluate_split(self, split: str) -> dict:
        self._sync_replicated_buffers()
        bar = None
        if show_progress(self.env.is_main):
            from tqdm import tqdm

            bar = functools.partial(tqdm, desc=f"eval {split}", unit="batch", leave=False, mininterval=2.0)
        return evaluate(self.dmp, self.loaders[split], self.env.device, self.bucket_of_id,
                        self.cfg.data.bucket_feature, progress=bar, group_of_id=self.group_of_id,
                        group_names=self.group_names)

    def _evaluate_and_select(self) -> None:
        self.loss_watch.check(f"before the evaluation at step {self.state.step}")
        self.heartbeat.beat("evaluating")
        valid, test = self.evaluate_split("valid"), self.evaluate_split("test")
        self.heartbeat.beat("evaluated")
        entry = {"epoch": self.state.epoch, "step": self.state.step, "valid": valid, "test": test}
        if self.collapse:   # embedding-collapse diagnostics (a collective: every rank)
            entry["collapse"] = self.collapse(self.dmp)
            log.info(self.collapse.summary(entry["collapse"]))
        if self.transfer:
            entry["transfer"] = self.transfer.flush_metrics()
            log.info("transfer metrics: %s", entry["transfer"])
        self.state.history.append(entry)
        if self.env.is_main:
            append_progress(self.run_dir, entry)
        if self.metrics and self.env.is_main:
            for split, res in (("valid", valid), ("test", test)):
                for bucket, m in res.items():
                    self.metrics.on_eval(split, bucket, m["auc"], m["logloss"], m["ne"])
            if "collapse" in entry:
                CollapseMonitor.export(self.metrics, entry["collapse"])
        auc = valid["all"]["auc"]
        if auc > self.state.best_valid_auc:
            self.state.best_valid_auc, self.state.best, self.state.bad_evals = auc, entry, 0
        else:
            self.state.bad_evals += 1
            if self.cfg.train.early_stop_patience and self.state.bad_evals >= self.cfg.train.early_stop_patience:
                self.state.done = True
        log.info("eval after epoch %d (step %d): valid auc %.4f test auc %.4f", self.state.epoch, self.state.step,
                 auc, test["all"]["auc"])

    def results(self) -> dict:
        st = self.state
        return {"best": st.best, "history": st.history, "steps": st.step, "train_seconds": st.train_seconds,
                "ms_per_step": 1000 * st.train_seconds / max(1, st.step),
                "examples_per_second": st.step * self.cfg.data.batch_size * self.env.world_size
                / max(st.train_seconds, 1e-9),
                "world_size": self.env.world_size, "plan": self.plan_text}


class _NoBar:
    def update(self, n): ...
    def set_postfix(self, **kw): ...
    def close(self): ...


def _progress(show: bool, total: int, initial: int, desc: str):
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False, mininterval=2.0)
