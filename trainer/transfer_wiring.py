"""Harmless transfer in the trainer: domains, shadow features, per-table masks, metrics, checkpoint state.

Modes (``transfer.mode``, docs/ALGORITHMS.md §3-5):

==========  =============================  ======================================  ===============
mode        target domain                  how h (transfer gradient) is applied     optimizer
==========  =============================  ======================================  ===============
baseline    -                              no transfer, no shadow features          any
plus_t      T (all non-source seen ids)    main + ``transfer.weight`` * l_tr        any (FBGEMM too)
select      T'_eta (selective domain)      main + ``transfer.weight`` * l_tr        any
lexico      T                              kernel: d_i = h_i + lambda_i g_i         ours, lexico
both        T'_eta                         kernel: d_i = h_i + lambda_i g_i         ours, lexico
==========  =============================  ======================================  ===============

Source S = the top ``source_frac`` of the feature's seen train ids by count (``data.selective``).

**Shadow features.** Each transfer feature ``f`` (single-valued, e.g. ``movie_id``) gets a second
feature ``f__shadow`` on the same table. ``ShadowBatches`` appends it to every batch's KJT before the
pipeline: in training it holds the values of ``f`` that are in the target domain (other examples get an
empty bag), in evaluation it is empty. The transfer loss is computed on the shadow's pooled rows (one
row per unique target id of the batch), so its gradient reaches the kernel only through the shadow
lookups: our kernel separates g (ordinary features) from h (shadow features) per row at the owner
rank; FBGEMM kernels just add both. Source rows come from ``f``'s own pooled output, detached.
Transfer rows are a subset of the batch's ids (docs/ALGORITHMS.md §3 edge case 1).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.config import Config, TableConfig
from trainer.config_base import ConfigError
from trainer.optim.names import STEP_RULES

log = logging.getLogger("tailrec.transfer")

SHADOW_SUFFIX = "__shadow"
LEXICO_MODES = ("lexico", "both")
SELECT_MODES = ("select", "both")


def shadow_name(feature: str) -> str:
    return feature + SHADOW_SUFFIX


def is_active(cfg: Config) -> bool:
    return cfg.transfer.mode != "baseline"


def prepare_config(cfg: Config) -> None:
    """Validate the transfer settings and switch lexico on for the transfer tables (in place).

    lexico/both need our kernel (cfsgd / rowwise_adagrad) on every transfer table; the table gets a
    copy of its optimizer config with ``lexico=True``. Other modes force ``lexico=False`` on them.
    """
    t = cfg.transfer
    t.validate("transfer")
    if not is_active(cfg):
        return
    if not t.features:
        raise ConfigError(f"transfer.mode={t.mode} needs transfer.features (e.g. [movie_id])")
    for f in t.features:
        opt = cfg.embedding.for_table(f)[2]
        want = t.mode in LEXICO_MODES
        if want and opt.name not in STEP_RULES:
            raise ConfigError(f"transfer.mode={t.mode}: table {f} needs one of our kernels "
                              f"{list(STEP_RULES)} (embedding.optimizer.name), not {opt.name}; for the stock "
                              f"baseline use --method=stock, or turn transfer off with --transfer.mode=baseline")
        if opt.lexico != want:
            tc = copy.deepcopy(cfg.embedding.tables.get(f, TableConfig()))
            tc.optimizer = replace(opt, lexico=want)
            cfg.embedding.tables[f] = tc


def table_feature_names(cfg: Config, feature: str) -> list[str]:
    """Feature names of ``feature``'s table: itself, plus its shadow when it is a transfer feature."""
    if is_active(cfg) and feature in cfg.transfer.features:
        return [feature, shadow_name(feature)]
    return [feature]


@dataclass
class FeatureDomain:
    feature: str
    factor_dim: int                 # columns the transfer loss sees ([:dim]; FM/DeepFM tables are wider)
    is_source: torch.Tensor         # bool [num_embeddings]
    in_target: torch.Tensor         # bool [num_embeddings]: T, or T'_eta for select/both
    summary: dict = field(default_factory=dict)
    # int64 [num_embeddings]: each target id's co-occurrence neighbor in S (-1: none); the neighbor loss's anchor
    neighbor_of: torch.Tensor | None = None
    # float [num_embeddings]: the neighbor loss's per-id strength 1 / (1 + count / anchor_count_scale), a
    # prior that fades as an id's own training data grows (None: 1 for every id)
    anchor_weight: torch.Tensor | None = None


def build_domains(cfg: Config, factor_dims: dict[str, int], num_embeddings: dict[str, int]) -> dict[str, FeatureDomain]:
    """Source / target masks per transfer feature from the dataset's train statistics."""
    from data.selective import selective_target_domain

    t, out = cfg.transfer, {}
    for f in t.features:
        t0 = time.perf_counter()
        dom = selective_target_domain(cfg.data.path, f, t.source_frac, t.eta_quantile, t.target_frac)
        n = num_embeddings[f]
        is_source = torch.zeros(n, dtype=torch.bool)
        is_source[torch.from_numpy(dom.source_ids)] = True
        in_target = torch.zeros(n, dtype=torch.bool)
        tgt = dom.kept_ids if t.mode in SELECT_MODES else dom.target_ids
        in_target[torch.from_numpy(tgt)] = True
        summ = {k: (float(v) if isinstance(v, float) else int(v)) for k, v in dom.summary().items()}
        summ["target_used"] = int(len(tgt))
        summ["selective"] = t.mode in SELECT_MODES
        log.info("transfer domain %s: source %d, target %d, T'_eta kept %d dropped %d (eta %.4f)%s; %.2fs",
                 f, summ["source"], summ["target"], summ["kept"], summ["dropped"], summ["eta"],
                 " [selective: using T'_eta]" if summ["selective"] else " [using all of T]",
                 time.perf_counter() - t0)
        neighbor_of = torch.full((n,), -1, dtype=torch.long)
        if dom.neighbors is not None:
            neighbor_of[torch.from_numpy(dom.target_ids)] = torch.from_numpy(dom.neighbors)
        anchor_weight = None
        if t.anchor_count_scale > 0:
            from data.stats import load_counts

            cnt = torch.zeros(n, dtype=torch.float32)
            c = torch.from_numpy(load_counts(cfg.data.path)[f].astype(np.float32))
            cnt[:min(n, c.numel())] = c[:n]
            anchor_weight = 1.0 / (1.0 + cnt / t.anchor_count_scale)
        out[f] = FeatureDomain(f, factor_dims[f], is_source, in_target, summ, neighbor_of, anchor_weight)
    return out


# ------------------------------------------------------------------------------ batches
def _kjt_with_shadows(kjt: KeyedJaggedTensor, domains: dict[str, FeatureDomain], train: bool) -> KeyedJaggedTensor:
    keys = list(kjt.keys())
    lengths, values = [kjt.lengths()], [kjt.values()]
    weights = kjt.weights_or_none()
    if weights is not None:
        raise ValueError("shadow features do not support weighted KJTs")
    b = kjt.stride()
    for f, dom in domains.items():
        if train:
            jt = kjt[f]
            ln, v = jt.lengths(), jt.values()
            if bool((ln > 1).any()):
                raise ValueError(f"transfer feature {f!r} must be single-valued (one id per example)")
            keep = dom.in_target[v.long()]
            ex = torch.repeat_interleave(torch.arange(b), ln.long())
            sl = torch.zeros(b, dtype=ln.dtype)
            sl.index_add_(0, ex[keep], torch.ones(int(keep.sum()), dtype=ln.dtype))
            lengths.append(sl)
            values.append(v[keep])
        else:
            lengths.append(torch.zeros(b, dtype=kjt.lengths().dtype))
        keys.append(shadow_name(f))
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=b)


class ShadowBatches:
    """Wraps a batch iterator/iterable: appends the shadow features to each batch's KJT (on CPU,
    before the pipeline copies it). ``train=False`` (evaluation): empty shadow bags, so the sharded
    EBC sees the feature set it was built with and no transfer rows are looked up."""

    def __init__(self, source, domains: dict[str, FeatureDomain], train: bool):
        self.source, self.domains, self.train = source, domains, train

    def __iter__(self):
        for batch in self.source:
            yield self.wrap(batch)

    def __len__(self):
        return len(self.source)

    def wrap(self, batch):
        from dataclasses import replace as dc_replace

        return dc_replace(batch, sparse_features=_kjt_with_shadows(batch.sparse_features, self.domains, self.train))

    def __getattr__(self, name):   # set_epoch, state_dict, num_batches ... of the wrapped loader
        return getattr(self.source, name)


# ------------------------------------------------------------------------------ runtime
class TransferRuntime:
    """Everything the trainer needs for a transfer run (``None`` for baseline runs)."""

    def __init__(self, cfg: Config, domains: dict[str, FeatureDomain], device: torch.device):
        from trainer.optim.transfer_loss import build_transfer_loss

        self.cfg, self.domains, self.device = cfg, domains, device
        t = cfg.transfer
        self.mode = t.mode
        self.lexico = t.mode in LEXICO_MODES
        # lexico/both: the kernel balances h against g per row, so the loss enters unweighted
        # (lexico_weight = 1); lexico_weight = 0 is the matched-step control: the same lambda rule, no transfer
        self.coef = float(t.lexico_weight) if self.lexico else float(t.weight)
        self.losses = {f: build_transfer_loss(t, d.factor_dim, device, seed=cfg.train.seed)
                       for f, d in domains.items()}
        for d in domains.values():
            d.is_source = d.is_source.to(device)
            d.neighbor_of = d.neighbor_of.to(device) if d.neighbor_of is not None else None
            d.anchor_weight = d.anchor_weight.to(device) if d.anchor_weight is not None else None
        # per table, per statistic: [sum, count] of this rank's per-step values since the last evaluation
        self._acc: dict[str, dict[str, list[float]]] = {}
        self.dmp = None

    # -- wiring
    def attach(self, dmp) -> None:
        self.dmp = dmp

    def wrap(self, source, train: bool):
        return ShadowBatches(source, self.domains, train)

    # -- per step
    def _add(self, table: str, key: str, value: float) -> None:
        tot = self._acc.setdefault(table, {}).setdefault(key, [0.0, 0.0])
        tot[0] += float(value)
        tot[1] += 1.0

    def after_step(self, step: int, stats_every: int = 5) -> None:
        """End of a training step: the losses' own step (FRAGE's discriminator), then, every
        ``stats_every`` steps (reading them waits for the device), the statistics: the losses' metrics and
        the kernels' lambda percentiles. A first sample is taken right away after a start or evaluation."""
        fresh = not any(self._acc.values())
        sample = step % stats_every == 0 or fresh
        for f, lm in self.losses.items():
            lm.after_step()
            if sample:
                for k, v in lm.metrics().items():
                    if not math.isnan(v):
                        self._add(f, k, v)
        if self.lexico and self.dmp is not None and sample:
            from trainer.sharding import kernel_stats

            for table, st in kernel_stats(self.dmp).items():
                if table in self.domains:
                    for k, v in st.items():
                        if k.startswith("lambda_"):
                            self._add(table, k, v)

    def flush_metrics(self) -> dict:
        """Means of the per-step metrics since the last flush, per table (+ domain sizes), over every
        rank's steps. Collective: every rank calls it at each evaluation. The lambda statistics exist only
        on the rank(s) owning the table's rows, the transfer loss on every rank: sums and counts are added
        over ranks, so every rank (and rank 0's results.json and log) sees the table's lambda."""
        merged = _merge_over_ranks({f: self._acc.get(f, {}) for f in self.domains})
        self._acc = {}
        return {f: {k: s / n for k, (s, n) in merged[f].items()} | {"domain": dict(d.summary)}
                for f, d in self.domains.items()}

    def fold_for_checkpoint(self, rank: int) -> dict:
        """Collective, at each checkpoint: the sums since the last evaluation, merged over ranks, go into
        the checkpoint's metadata and from then on live on rank 0 only. A resumed run (``load_fold``)
        then reports exactly what an uninterrupted one does at its next evaluation."""
        merged = _merge_over_ranks({f: self._acc.get(f, {}) for f in self.domains})
        self.load_fold(merged, rank)
        return merged

    def load_fold(self, merged: dict, rank: int) -> None:
        self._acc = {f: {k: list(v) for k, v in st.items()} for f, st in merged.items()} if rank == 0 else {}

    def last_metrics(self) -> dict[str, dict[str, float]]:
        return {f: lm.metrics() for f, lm in self.losses.items()}

    # -- checkpoint (FRAGE discriminators; replicated plain tensors, DCP-friendly)
    def app_state(self) -> dict:
        out = {}
        for f, lm in self.losses.items():
            if self.cfg.transfer.loss == "frage":
                sd = {k: v for k, v in lm.discriminator.state_dict().items()}
                sd["d_steps"] = torch.tensor(lm.d_steps, dtype=torch.int64)
                out[f] = sd
        return out

    def load_app_state(self, st: dict) -> None:
        for f, sd in st.items():
            lm = self.losses[f]
            sd = dict(sd)
            lm.d_steps = int(sd.pop("d_steps"))
            lm.discriminator.load_state_dict(sd)


def _merge_over_ranks(local: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, list[float]]]:
    """{table: {stat: [sum, count]}} summed over ranks (a few floats per table: all_gather_object)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    out: dict[str, dict[str, list[float]]] = {f: {} for f in local}
    for part in parts:
        for f, stats in part.items():
            for k, (s, n) in stats.items():
                tot = out.setdefault(f, {}).setdefault(k, [0.0, 0.0])
                tot[0] += s
                tot[1] += n
    return out


def build_runtime(cfg: Config, tables, device: torch.device) -> TransferRuntime | None:
    if not is_active(cfg):
        return None
    from models import factor_dim

    factor = {t.name: factor_dim(cfg.model.name, t.embedding_dim) for t in tables}
    nume = {t.name: t.num_embeddings for t in tables}
    missing = [f for f in cfg.transfer.features if f not in factor]
    if missing:
        raise ConfigError(f"transfer.features {missing} are not tables of this run ({sorted(factor)})")
    return TransferRuntime(cfg, build_domains(cfg, factor, nume), device)


# ------------------------------------------------------------------------------ eval groups
def planted_groups(dataset_dir: str | Path, feature: str, planted_json: str | Path) -> np.ndarray:
    """id -> group (0 twin, 1 loner, 2 other) from the generator's planted.json (raw movie ids),
    through the dataset's vocabulary (dense id -> raw value)."""
    import json

    from data.writer import load_vocab

    p = json.loads(Path(planted_json).read_text())
    vocab = load_vocab(dataset_dir, feature)
    twins = {str(t) for t, _ in p["twins"]}
    loners = {str(m) for m in p["loners"]}
    out = np.full(len(vocab), 2, dtype=np.int8)
    for i, v in enumerate(vocab):
        if v in twins:
            out[i] = 0
        elif v in loners:
            out[i] = 1
    return out


MAX_EVAL_GROUPS = 32          # groups become a Prometheus label value: keep the set small and bounded
RESERVED_GROUPS = ("all", "head", "torso", "tail")


def csv_groups(dataset_dir: str | Path, feature: str, path: str | Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """``<feature id>,<group>`` lines (raw id as in the source data, any group names; an optional
    ``id,group`` header) -> (dense id -> group index, -1 = no group; group names in first-seen order).

    Refused with the file and line named: a line without exactly two fields, an empty or reserved group
    name, an id given two different groups, more than MAX_EVAL_GROUPS groups. Ids the dataset's vocabulary
    does not hold are counted and logged (they cannot occur in the evaluation)."""
    import csv

    from data.writer import load_vocab

    index = {v: i for i, v in enumerate(load_vocab(dataset_dir, feature))}
    out = np.full(len(index), -1, dtype=np.int16)
    names: list[str] = []
    first_line: dict[str, tuple[int, str]] = {}
    unknown = 0
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for line_no, row in enumerate(csv.reader(fh), start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            where = f"{path}:{line_no}"
            if len(row) != 2:
                raise ConfigError(f"transfer.eval_groups: {where}: expected '<feature id>,<group>', got {len(row)} fields")
            raw, group = row[0].strip(), row[1].strip()
            if line_no == 1 and (raw.lower(), group.lower()) == ("id", "group"):
                continue
            if not group or group in RESERVED_GROUPS:
                raise ConfigError(f"transfer.eval_groups: {where}: group name {group!r} is empty or reserved "
                                  f"({', '.join(RESERVED_GROUPS)})")
            if raw in first_line and first_line[raw][1] != group:
                raise ConfigError(f"transfer.eval_groups: {where}: id {raw!r} is in group {first_line[raw][1]!r} "
                                  f"at line {first_line[raw][0]} and in {group!r} here")
            first_line.setdefault(raw, (line_no, group))
            if group not in names:
                names.append(group)
                if len(names) > MAX_EVAL_GROUPS:
                    raise ConfigError(f"transfer.eval_groups: {where}: more than {MAX_EVAL_GROUPS} groups")
            if raw not in index:
                unknown += 1
                continue
            out[index[raw]] = names.index(group)
    if unknown:
        log.warning("transfer.eval_groups %s: %d id(s) are not in %s's vocabulary (never evaluated)",
                    path, unknown, feature)
    return out, tuple(names)


def eval_groups(cfg: Config) -> tuple[np.ndarray, tuple[str, ...]] | None:
    """``transfer.eval_groups`` -> (id -> group index on ``data.bucket_feature``, group names), or None.
    A ``.json`` file is a generator's planted.json (twin / loner / other); anything else a CSV of
    ``<feature id>,<group>`` lines (``csv_groups``)."""
    if not cfg.transfer.eval_groups:
        return None
    if not cfg.data.bucket_feature:
        raise ConfigError("transfer.eval_groups needs data.bucket_feature (the feature whose ids it groups)")
    path = cfg.transfer.eval_groups
    if not Path(path).is_file():
        raise ConfigError(f"transfer.eval_groups: {path}: no such file")
    if str(path).endswith(".json"):
        from data.generate import PLANTED_GROUPS

        return planted_groups(cfg.data.path, cfg.data.bucket_feature, path), PLANTED_GROUPS
    return csv_groups(cfg.data.path, cfg.data.bucket_feature, path)
