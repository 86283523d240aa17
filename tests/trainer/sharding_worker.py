"""torchrun worker for tests/trainer/test_sharding.py (no tests here).

`torchrun --nproc_per_node N tests/trainer/sharding_worker.py OUT.json SCENARIO...`
runs the scenarios on gloo/CPU and rank 0 writes max errors against a float64 single-process
replay (rules.py / FBGEMM's documented rules) to OUT.json.
"""
import faulthandler
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.comm_ops import get_gradient_division

from trainer.config import EmbeddingConfig, EmbOptimConfig, TableConfig
from tests.optim.reference import ref_step
from trainer.optim import rules
from trainer.optim.rules import rule_config_from
from trainer.optim.torchrec_adapter import tailrec_kernels_of
from trainer.sharding import load_ub_state, set_main_loss, set_optimizer_step, shard_model, ub_state

B = 8
SHADOW = "__shadow"
LOSS_TERM_BINDS = [0]   # rows of the reference where phi = alpha * loss (||g||^2 > loss)


class Wrapper(nn.Module):
    def __init__(self, tables: List[EmbeddingBagConfig], weighted: bool) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"), is_weighted=weighted)

    def forward(self, kjt: KeyedJaggedTensor):
        return self.ebc(kjt)


def feature_order(tables):
    return [(f, t) for t in tables for f in t.feature_names]


def gen_kjt(tables, step, rank, weighted, seed, max_len=4):
    g = torch.Generator().manual_seed(100003 * seed + 1009 * step + rank)
    lengths, values = [], []
    for _, t in feature_order(tables):
        ln = torch.randint(0, max_len, (B,), generator=g)
        lengths.append(ln)
        # long-tail ids: small rows are hit more often
        u = torch.rand(int(ln.sum()), generator=g)
        values.append((t.num_embeddings ** u).long().clamp(0, t.num_embeddings - 1))
    values, lengths = torch.cat(values), torch.cat(lengths)
    w = torch.rand(values.numel(), generator=g) * 1.5 + 0.25 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=[f for f, _ in feature_order(tables)], values=values,
                                               lengths=lengths, weights=w)


def losses(pooled: Dict[str, torch.Tensor], coef: Dict[str, float]):
    """Per-rank means: main over ordinary features, transfer over shadow features."""
    main = sum(coef.get(f, 1.0) * (o ** 2).sum() for f, o in pooled.items() if not f.endswith(SHADOW)) / B
    tr = [coef.get(f, 1.0) * (o ** 2).sum() for f, o in pooled.items() if f.endswith(SHADOW)]
    return main, (sum(tr) / B if tr else None)


def gather_sharded(st) -> torch.Tensor:
    """Full tensor on every rank; `st` may be None on ranks that hold no shard of it."""
    local = [] if st is None else [(list(s.metadata.shard_offsets), s.tensor.detach().clone())
                                   for s in st.local_shards()]
    meta = None if st is None else (tuple(st.size()), st.dtype)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (meta, local))
    size, dtype = next(m for m, _ in parts if m is not None)
    out = torch.zeros(size, dtype=dtype)
    for _, loc in parts:
        for offs, t in loc:
            out[tuple(slice(o, o + n) for o, n in zip(offs, t.shape))] = t
    return out


def weights_of(dmp, tables):
    sd = dmp.state_dict()
    return {t.name: gather_sharded(sd[f"ebc.embedding_bags.{t.name}.weight"]) for t in tables}


def opt_state_of(dmp, tables, key):
    osd = dmp.fused_optimizer.state_dict()["state"]
    out = {}
    for t in tables:
        st = osd.get(f"ebc.embedding_bags.{t.name}.weight", {}).get(f"{t.name}.{key}")
        present = [None] * dist.get_world_size()
        dist.all_gather_object(present, st is not None)
        if any(present):
            out[t.name] = gather_sharded(st)
    return out


def build(tables, emb_cfg, weighted, extra=None):
    return shard_model(Wrapper(tables, weighted), emb_cfg, tables, dist.group.WORLD, torch.device("cpu"),
                       extra_constraints=extra)


def train(dmp, tables, steps, weighted, seed, coef, start=0, lexico=False, reduce=True, loss_scale=1.0):
    """``reduce=False`` / ``loss_scale``: deliberately broken set_main_loss calls (negative controls)."""
    rank = dist.get_rank()
    for s in range(start, start + steps):
        kt = dmp(gen_kjt(tables, s, rank, weighted, seed))
        main, tr = losses(kt.to_dict(), coef)
        if lexico:
            set_main_loss(dmp, main * loss_scale, reduce=reduce)
        (main + tr if tr is not None else main).backward()


# ------------------------------------------------------------------ float64 reference
def ref_grads(tables, W, step, world, weighted, seed, coef):
    """Dense float64 autograd over all ranks' batches: G (main), H (transfer), touched masks, loss."""
    Wp = {n: w.clone().requires_grad_(True) for n, w in W.items()}
    tmain, ttr = 0.0, 0.0
    touched = {t.name: torch.zeros(t.num_embeddings, dtype=torch.bool) for t in tables}
    touched_h = {t.name: torch.zeros(t.num_embeddings, dtype=torch.bool) for t in tables}
    for r in range(world):
        d = gen_kjt(tables, step, r, weighted, seed).to_dict()
        pooled = {}
        for f, t in feature_order(tables):
            jt = d[f]
            off = torch.cat([torch.zeros(1, dtype=torch.long), jt.lengths().cumsum(0)])
            psw = jt.weights().double() if weighted else None
            pooled[f] = F.embedding_bag(jt.values(), Wp[t.name], off, mode="sum", include_last_offset=True,
                                        per_sample_weights=psw)
            (touched_h if f.endswith(SHADOW) else touched)[t.name][jt.values()] = True
        m, tr = losses(pooled, coef)
        tmain, ttr = tmain + m / world, (ttr + tr / world) if tr is not None else ttr
    G = torch.autograd.grad(tmain, list(Wp.values()), retain_graph=True, allow_unused=True)
    H = torch.autograd.grad(ttr, list(Wp.values()), allow_unused=True) if torch.is_tensor(ttr) else [None] * len(G)
    z = lambda x, n: x if x is not None else torch.zeros_like(W[n])  # noqa: E731
    names = list(Wp)
    return ({n: z(G[i], n) for i, n in enumerate(names)}, {n: z(H[i], n) for i, n in enumerate(names)},
            touched, touched_h, float(tmain))


def ref_fbgemm(name, w, g, st, opt):
    """FBGEMM's documented rules on the rows touched (g summed per row)."""
    lr, eps = opt.lr, opt.eps
    if name == "exact_sgd":
        return w - lr * g
    if name == "exact_adagrad":
        st["s"] = st.get("s", torch.zeros_like(w)) + g * g
        return w - lr * g / (st["s"].sqrt() + eps)
    if name == "exact_rowwise_adagrad":
        st["s"] = st.get("s", torch.zeros(w.shape[0], dtype=w.dtype)) + (g * g).mean(1)
        return w - (lr / (st["s"].sqrt() + eps)).unsqueeze(1) * g
    if name == "counter_sgd":  # halflife -1, no warm-up
        st["c"] = st.get("c", torch.zeros(w.shape[0], dtype=w.dtype)) + 1
        return w - (lr / ((opt.adjustment_ub * st["c"]).sqrt() + eps)).unsqueeze(1) * g
    raise ValueError(name)


def plan_shards(res) -> Dict[str, list]:
    """{table: [(row0, rows, col0, cols), ...]} of a ShardResult's plan (what ub_mode="table" keeps apart)."""
    return {n: [(int(sh.shard_offsets[0]), int(sh.shard_sizes[0]), int(sh.shard_offsets[1]), int(sh.shard_sizes[1]))
                for sh in p.sharding_spec.shards] if p.sharding_spec is not None else [(0, 10**9, 0, 10**9)]
            for n, p in res.plan.plan["ebc"].items()}


def _ref_table_ub(rc, w, g, st, step, shards, tstate, h=None, has_h=None, loss=None):
    """ub_mode="table" replayed shard by shard: each shard of a table (a block of rows and columns, from the
    plan) keeps its own running mean of x_t over the rows it owns and the columns it holds."""
    before = {key: list(v) for key, v in st.items()}
    for k, (r0, nr, c0, nc) in enumerate(shards):
        rows = [i for i in range(len(w)) if r0 <= st["_row"][i] < r0 + nr]
        sub = {key: [v[i] for i in rows] for key, v in before.items() if key != "_row"}
        new_w, sub, _ = ref_step(rc, [w[i][c0:c0 + nc] for i in rows], [g[i][c0:c0 + nc] for i in rows], sub, step,
                                 None if h is None else [h[i][c0:c0 + nc] for i in rows],
                                 None if has_h is None else [has_h[i] for i in rows], loss,
                                 table=tstate.setdefault(k, {"ub_sum": 0.0, "ub_count": 0}),
                                 rows=[st["_row"][i] for i in rows])
        for j, i in enumerate(rows):
            w[i][c0:c0 + nc] = new_w[j]
            if c0 == 0:   # every column shard keeps the same counters; keep the first one's
                for key in sub:
                    st[key][i] = sub[key][j]
    return w, st


def reference(tables, emb_cfg, W0, steps, world, weighted, seed, coef, start=0, state=None, shards=None):
    """``shards``: {table: [(row0, rows, col0, cols), ...]} from the plan, needed by ub_mode="table" tables."""
    W = {n: w.double().clone() for n, w in W0.items()}
    state = state or {}
    div = 1.0 if get_gradient_division() else float(world)  # owner sees sum/world with division
    for s in range(start, start + steps):
        G, H, touched, touched_h, loss = ref_grads(tables, W, s, world, weighted, seed, coef)
        for t in tables:
            opt = emb_cfg.for_table(t.name)[2]
            n, g, h = t.name, G[t.name] * div, H[t.name] * div
            if opt.name in rules.STEP_RULES:
                rc = rule_config_from(opt)
                st = state.setdefault(n, {k: v.double() for k, v in rules.init_state(rc, t.num_embeddings).items()})
                rows = (touched[n] if rc.lexico else touched[n] | touched_h[n]).nonzero().squeeze(1)
                sub = {k: [float(x) if v.dtype.is_floating_point else int(x) for x in v[rows].tolist()]
                       for k, v in st.items()}
                # the papers' formulas as float64 loops (tests/optim/reference.py), not rules.py
                if rc.table_ub:
                    new_w, sub = _ref_table_ub(rc, W[n][rows].tolist(), g[rows].tolist(), {**sub, "_row": rows.tolist()},
                                               s + 1, shards[n], state.setdefault(("ub", n), {}), h[rows].tolist(),
                                               touched_h[n][rows].tolist(), loss)
                    sub.pop("_row")
                else:
                    new_w, sub, _ = ref_step(rc, W[n][rows].tolist(), g[rows].tolist(), sub, s + 1, h[rows].tolist(),
                                             touched_h[n][rows].tolist(), loss, rows=rows.tolist())
                if rows.numel():
                    W[n][rows] = torch.tensor(new_w, dtype=W[n].dtype)
                    for k, v in sub.items():
                        st[k][rows] = torch.tensor(v, dtype=st[k].dtype)
                if rc.lexico:
                    binding = (g[rows].square().sum(1) > loss).sum().item()
                    LOSS_TERM_BINDS[0] += int(binding)
            else:
                st = state.setdefault(n, {})
                rows = (touched[n] | touched_h[n]).nonzero().squeeze(1)
                sub = {k: v[rows] for k, v in st.items()}
                W[n][rows] = ref_fbgemm(opt.name, W[n][rows], g[rows] + h[rows], sub, opt)
                for k, v in sub.items():
                    st.setdefault(k, torch.zeros((t.num_embeddings,) + v.shape[1:], dtype=v.dtype))[rows] = v
    return W, state


# ------------------------------------------------------------------ scenarios
def emb_config(table_opts: Dict[str, EmbOptimConfig], sharding: str, shardings=None) -> EmbeddingConfig:
    shardings = shardings or {}
    return EmbeddingConfig(dim=8, sharding_type=sharding, tables={
        n: TableConfig(optimizer=o, sharding_type=shardings.get(n)) for n, o in table_opts.items()})


def main_tables():
    return [
        EmbeddingBagConfig(num_embeddings=60, embedding_dim=8, name="t0", feature_names=["a"]),
        EmbeddingBagConfig(num_embeddings=40, embedding_dim=8, name="t1", feature_names=["b", "b2"]),
        EmbeddingBagConfig(num_embeddings=30, embedding_dim=64, name="t2", feature_names=["c"]),  # CW: 2 shards
        EmbeddingBagConfig(num_embeddings=50, embedding_dim=8, name="t3", feature_names=["d"]),
        EmbeddingBagConfig(num_embeddings=44, embedding_dim=8, name="t4", feature_names=["e"]),
    ]


def run_ours(sharding: str) -> Dict[str, float]:
    """Our kernel (3 tables, 3 rule variants) + one FBGEMM table side by side. t0 keeps a 1-byte approximate
    counter (its coin hashes the table-global row: row shards must agree with the unsharded replay), t2 under
    column_wise a 2-byte one (both column shards must draw the same coins)."""
    tables = main_tables()
    opts = {"t0": EmbOptimConfig(name="cfsgd", lr=0.2, adjustment_ub=2.0, counter_form="paper", horizon=6,
                                 counter_bytes=1),
            "t1": EmbOptimConfig(name="cfsgd", lr=0.1, counter_halflife=2.0, adjustment_iter=2),
            # column_wise: t2's two column shards each keep their own ub estimate (ub_mode="table")
            "t2": EmbOptimConfig(name="rowwise_adagrad", lr=0.1) if sharding != "column_wise" else
                  EmbOptimConfig(name="cfsgd", lr=0.1, ub_mode="table", counter_bytes=2),
            "t3": EmbOptimConfig(name="exact_sgd", lr=0.1),
            # our default rule (per-table ub; row shards under row_wise)
            "t4": EmbOptimConfig(name="cfsgd", lr=0.05, ub_mode="table", ub_rows="geometric", counter_halflife=3.0)}
    cfg = emb_config(opts, sharding)
    # compact counters start at the level whose coin is fair (b^-k = 1/2): every touch is a real draw, so a
    # wrong row or step in the hash shows (from level 0 the first raises are near-certain)
    start_level = {"t0": 8} if sharding != "column_wise" else {"t0": 8, "t2": 1024}
    out = {}
    for weighted in (False, True):
        # column_wise: force t2 (dim 64) into 2 column shards of 32, one per rank
        res = build(tables, cfg, weighted, extra={"t2": {"min_partition": 32}} if sharding == "column_wise" else None)
        for k in tailrec_kernels_of(res.dmp):
            for t, tc in enumerate(k.config.embedding_tables):
                if tc.name in start_level:
                    k.emb_module.split_state("counter")[t].fill_(start_level[tc.name])
        W0 = weights_of(res.dmp, tables)
        train(res.dmp, tables, 4, weighted, seed=1, coef={})
        out["t2_shards"] = [(list(s.shard_offsets), str(s.placement))
                            for s in res.plan.plan["ebc"]["t2"].sharding_spec.shards]
        W1, C1 = weights_of(res.dmp, tables), opt_state_of(res.dmp, tables, "momentum1")
        levels = {n: {"counter": torch.full((t.num_embeddings,), float(start_level[n]), dtype=torch.float64)}
                  for t in tables for n in [t.name] if n in start_level}
        Wr, Sr = reference(tables, cfg, W0, 4, dist.get_world_size(), weighted, 1, {}, shards=plan_shards(res),
                           state=levels)
        out[f"w_err_weighted{int(weighted)}"] = max((W1[n].double() - Wr[n]).abs().max().item() for n in Wr)
        out[f"moved_weighted{int(weighted)}"] = max((W1[n] - W0[n]).abs().max().item() for n in Wr)
        first = {"t0": "counter", "t1": "counter", "t2": "adagrad_sum" if sharding != "column_wise" else "counter"}
        cerr = 0.0
        for n, key in first.items():
            ref = Sr[n][key]
            cerr = max(cerr, (C1[n].double() - ref.repeat(C1[n].numel() // ref.numel())).abs().max().item())
        out[f"state_err_weighted{int(weighted)}"] = cerr
        out["plan_text"] = res.plan_text
    return out


def run_lexico(sharding: str, loss_binds: bool = False) -> Dict[str, float]:
    """``loss_binds``: main-loss coefficients so large that ||g_i||^2 > loss for many rows, so the barrier is
    phi = alpha * (global mean loss): the result then depends on set_main_loss's all-reduce and scale."""
    tables = [EmbeddingBagConfig(num_embeddings=40, embedding_dim=8, name="ts", feature_names=["f", "f" + SHADOW]),
              EmbeddingBagConfig(num_embeddings=30, embedding_dim=4, name="tx", feature_names=["x"])]
    lex = dict(name="cfsgd", lr=0.1 if not loss_binds else 0.002, lexico=True)
    cfg = emb_config({"ts": EmbOptimConfig(**lex, lexico_h_clip=0.0), "tx": EmbOptimConfig(**lex)}, sharding)
    coef = {"f": 1.0, "f" + SHADOW: 3.0, "x": 0.5} if not loss_binds else {"f": 60.0, "f" + SHADOW: 3.0, "x": 40.0}
    LOSS_TERM_BINDS[0] = 0
    res = build(tables, cfg, False)
    W0 = weights_of(res.dmp, tables)
    train(res.dmp, tables, 4, False, seed=7, coef=coef, lexico=True)
    W1 = weights_of(res.dmp, tables)
    Wr, _ = reference(tables, cfg, W0, 4, dist.get_world_size(), False, 7, coef, shards=plan_shards(res))
    # the same steps with lexico off (g + h): proves lambda (which needs g and h apart) mattered
    plain = emb_config({"ts": EmbOptimConfig(name="cfsgd", lr=0.1), "tx": EmbOptimConfig(name="cfsgd", lr=0.1)}, sharding)
    Wp, _ = reference(tables, plain, W0, 4, dist.get_world_size(), False, 7, coef, shards=plan_shards(res))
    binds = LOSS_TERM_BINDS[0]
    controls = {}
    if loss_binds:   # the same run with the barrier fed a wrong loss must NOT match the reference
        for label, kw in (("no_allreduce", dict(reduce=False)), ("loss_x1000", dict(loss_scale=1000.0))):
            bad = build(tables, cfg, False)
            W0b = weights_of(bad.dmp, tables)
            Wrb, _ = reference(tables, cfg, W0b, 4, dist.get_world_size(), False, 7, coef, shards=plan_shards(bad))
            train(bad.dmp, tables, 4, False, seed=7, coef=coef, lexico=True, **kw)
            W1b = weights_of(bad.dmp, tables)
            controls[f"w_err_{label}"] = max((W1b[n].double() - Wrb[n]).abs().max().item() for n in Wrb)
    return {**controls,"w_err": max((W1[n].double() - Wr[n]).abs().max().item() for n in Wr),
            "lexico_vs_plain": max((Wp[n] - Wr[n]).abs().max().item() for n in Wr),
            "loss_term_binds_rows": binds}


def run_fbgemm() -> Dict[str, float]:
    """Each FBGEMM baseline on a tiny table: only looked-up rows change, by the documented rule."""
    names = ["exact_sgd", "exact_adagrad", "exact_rowwise_adagrad", "counter_sgd"]
    tables = [EmbeddingBagConfig(num_embeddings=20, embedding_dim=4, name=f"e{i}", feature_names=[f"q{i}"])
              for i in range(len(names))]
    cfg = emb_config({f"e{i}": EmbOptimConfig(name=n, lr=0.1, adjustment_ub=2.0) for i, n in enumerate(names)},
                     "table_wise")
    res = build(tables, cfg, False)
    W0 = weights_of(res.dmp, tables)
    train(res.dmp, tables, 3, False, seed=3, coef={})
    W1 = weights_of(res.dmp, tables)
    Wr, _ = reference(tables, cfg, W0, 3, dist.get_world_size(), False, 3, {}, shards=plan_shards(res))
    out = {f"err_{n}": (W1[f"e{i}"].double() - Wr[f"e{i}"]).abs().max().item() for i, n in enumerate(names)}
    touched = torch.zeros(20, dtype=torch.bool)
    for s in range(3):
        for r in range(dist.get_world_size()):
            touched[gen_kjt(tables, s, r, False, 3)["q3"].values()] = True
    cnt = opt_state_of(res.dmp, tables, "row_counter").get("e3")
    out["counter_sgd_counter_max"] = float(cnt.max()) if cnt is not None else -1.0
    out["untouched_changed"] = max((W1[t.name][~touched] - W0[t.name][~touched]).abs().max().item()
                                   for t in tables[3:])
    out["touched_rows"] = int(touched.sum())
    return out


def copy_weights(src, dst, tables):
    ss, ds = src.state_dict(), dst.state_dict()
    for t in tables:
        k = f"ebc.embedding_bags.{t.name}.weight"
        for a, b in zip(ss[k].local_shards(), ds[k].local_shards()):
            b.tensor.detach().copy_(a.tensor)


def run_vs_fbgemm_counter(halflife: float, adj_iter: int) -> Dict[str, float]:
    """Our cfsgd (lexico off) against FBGEMM COUNTER_SGD configured to the same rule (FBGEMM's fixed ub)."""
    tables = [EmbeddingBagConfig(num_embeddings=30, embedding_dim=4, name="tc", feature_names=["p", "p2"])]
    kw = dict(lr=0.1, adjustment_ub=2.0, counter_halflife=halflife, adjustment_iter=adj_iter)
    ours = build(tables, emb_config({"tc": EmbOptimConfig(name="cfsgd", ub_mode="fixed", **kw)}, "table_wise"), True)
    fb = build(tables, emb_config({"tc": EmbOptimConfig(name="counter_sgd", **kw)}, "table_wise"), True)
    copy_weights(ours.dmp, fb.dmp, tables)
    errs = []
    for s in range(6):
        train(ours.dmp, tables, 1, True, seed=5, coef={}, start=s)
        train(fb.dmp, tables, 1, True, seed=5, coef={}, start=s)
        errs.append((weights_of(ours.dmp, tables)["tc"] - weights_of(fb.dmp, tables)["tc"]).abs().max().item())
    c_ours = opt_state_of(ours.dmp, tables, "momentum1")["tc"]
    c_fb = opt_state_of(fb.dmp, tables, "row_counter")["tc"]
    return {"w_err_per_step": errs, "counter_err": (c_ours - c_fb).abs().max().item()}


def dcp_tables():
    return [EmbeddingBagConfig(num_embeddings=50, embedding_dim=8, name="k0", feature_names=["u"]),
            EmbeddingBagConfig(num_embeddings=30, embedding_dim=8, name="k1", feature_names=["v", "v" + SHADOW])]


def dcp_cfg():
    return emb_config({"k0": EmbOptimConfig(name="cfsgd", lr=0.1, counter_halflife=3.0),
                       # a 1-byte approximate counter: its uint8 levels go through DCP too
                       "k1": EmbOptimConfig(name="cfsgd", lr=0.1, lexico=True, counter_bytes=1)}, "row_wise")


def snapshot(dmp, tables) -> Dict[str, list]:
    out = {f"W_{n}": w.tolist() for n, w in weights_of(dmp, tables).items()}
    for key in ("momentum1", "last_step"):
        for n, v in opt_state_of(dmp, tables, key).items():
            out[f"{key}_{n}"] = v.tolist()
    for k in tailrec_kernels_of(dmp):                   # our kernels' step (set_optimizer_step after a load)
        for tc in k.config.embedding_tables:
            out[f"step_{tc.name}"] = [int(k.emb_module.step)]
    out["ub_state"] = ub_state(dmp)    # every rank's per-shard ub estimates (trainer checkpoint metadata)
    return out


def run_dcp(mode: str, ckpt: str) -> Dict[str, dict]:
    import torch.distributed.checkpoint as dcp

    tables = dcp_tables()
    res = build(tables, dcp_cfg(), False)
    coef = {"v" + SHADOW: 2.0}
    if mode == "save":
        train(res.dmp, tables, 3, False, seed=9, coef=coef, lexico=True)
        dcp.save({"model": res.dmp.state_dict(), "optim": res.dmp.fused_optimizer.state_dict()}, checkpoint_id=ckpt)
        ub = snapshot(res.dmp, tables)["ub_state"]   # collective: every rank
        if dist.get_rank() == 0:   # what the trainer puts in its checkpoint metadata
            Path(ckpt, "ub_state.json").write_text(json.dumps(ub))
        dist.barrier()
    else:
        sd = {"model": res.dmp.state_dict(), "optim": res.dmp.fused_optimizer.state_dict()}
        dcp.load(sd, checkpoint_id=ckpt)
        load_ub_state(res.dmp, json.loads(Path(ckpt, "ub_state.json").read_text()))
        res.dmp.load_state_dict(sd["model"])
        res.dmp.fused_optimizer.load_state_dict(sd["optim"])
        set_optimizer_step(res.dmp, 3)  # restores our kernels' step (not in the DCP state) and FBGEMM's iter
    at_ckpt = snapshot(res.dmp, tables)
    train(res.dmp, tables, 3, False, seed=9, coef=coef, start=3, lexico=True)
    return {"at_ckpt": at_ckpt, "final": snapshot(res.dmp, tables)}


def main(argv: List[str]) -> None:
    faulthandler.enable()  # a native abort prints every thread's Python stack (the test shows stderr)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out_path, scenarios = argv[0], argv[1:]
    results = {}
    for sc in scenarios:
        kind, _, arg = sc.partition(":")
        if kind == "ours":
            results[sc] = run_ours(arg)
        elif kind == "lexico":
            results[sc] = run_lexico(arg)
        elif kind == "lexicoloss":
            results[sc] = run_lexico(arg, loss_binds=True)
        elif kind == "fbgemm":
            results[sc] = run_fbgemm()
        elif kind == "vsfbgemm":
            hl, adj = arg.split(",")
            results[sc] = run_vs_fbgemm_counter(float(hl), int(adj))
        elif kind in ("dcpsave", "dcpload"):
            results[sc] = run_dcp(kind[3:], arg)
        else:
            raise SystemExit(f"unknown scenario {sc}")
        print(f"rank {dist.get_rank()}: {sc} done", flush=True)  # the test's message shows how far it got
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()  # no collective in flight when the group goes
    dist.destroy_process_group()
    # Skip interpreter teardown. CI once saw rank 0 abort with "terminate called without an active
    # exception" (the usual cause: a native gloo/autograd thread needing the GIL while Python
    # finalises); 80 local reruns did not reproduce it. The results are written; a failure inside a
    # scenario still exits non-zero, and the progress lines + faulthandler show where.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main(sys.argv[1:])
