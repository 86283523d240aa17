"""TailrecTBE (no TorchRec): forward pooling and the fused backward+update, C++ path and
pure-torch path, against a float64 reference (dense autograd for g/h + rules.apply_step in
float64). Tolerance: rtol 1e-5, atol 1e-6 (kernel math is float32)."""
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.optim.reference import ref_step
from trainer.optim import kernel, rules
from trainer.optim.rules import RuleConfig

ROWS, DIMS = [30, 20, 10], [8, 8, 4]
FEATS = [("a", 0), ("b", 1), ("b__shadow", 1), ("c", 2), ("c__shadow", 2)]
COEF = {"a": 1.0, "b": 0.5, "b__shadow": 2.0, "c": 1.5, "c__shadow": -0.7}
B = 6


def make_batch(seed, weighted, max_len=4):
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for _, t in FEATS:
        ln = torch.randint(0, max_len, (B,), generator=g)
        lengths.append(ln)
        values.append(torch.randint(0, ROWS[t], (int(ln.sum()),), generator=g))
    lengths = torch.cat(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    psw = torch.rand(int(lengths.sum()), generator=g) + 0.5 if weighted else None
    return torch.cat(values), offsets, psw


def build(cfg, pooling="sum"):
    tbe = kernel.TailrecTBE(ROWS, DIMS, [t for _, t in FEATS], [f.endswith("__shadow") for f, _ in FEATS],
                            cfg, pooling=pooling)
    torch.manual_seed(0)
    tbe.weights.uniform_(-0.5, 0.5)
    return tbe


def loss_of(out_by_feat, loss_scale=1.0):
    main = sum(COEF[f] * (o ** 2).sum() for f, o in out_by_feat.items() if not f.endswith("__shadow"))
    tr = sum(COEF[f] * (o ** 2).sum() for f, o in out_by_feat.items() if f.endswith("__shadow"))
    return main * loss_scale, tr


def split_out(out):
    cols, res = 0, {}
    for f, t in FEATS:
        res[f] = out[:, cols:cols + DIMS[t]]
        cols += DIMS[t]
    return res


def reference_step(W, state, cfg, batch, step, pooling, tables=None):
    """float64: dense autograd gives per-row g (main) and h (transfer); then rules in float64."""
    idx, off, psw = batch
    Wp = [w.double().clone().requires_grad_(True) for w in W]
    outs = {}
    for k, (f, t) in enumerate(FEATS):
        o = off[k * B:(k + 1) * B + 1]
        s, e = int(o[0]), int(o[-1])
        outs[f] = F.embedding_bag(idx[s:e], Wp[t], o - s, mode=pooling, include_last_offset=True,
                                  per_sample_weights=None if psw is None else psw[s:e].double())
    main, tr = loss_of(outs)
    G = torch.autograd.grad(main, Wp, retain_graph=True, allow_unused=True)
    H = torch.autograd.grad(tr, Wp, allow_unused=True)
    lam_all = []
    for t in range(len(ROWS)):
        touched_main, touched_h = torch.zeros(ROWS[t], dtype=torch.bool), torch.zeros(ROWS[t], dtype=torch.bool)
        for k, (f, tt) in enumerate(FEATS):
            if tt == t:
                s, e = int(off[k * B]), int(off[(k + 1) * B])
                (touched_h if f.endswith("__shadow") else touched_main)[idx[s:e]] = True
        rows = (touched_main if cfg.lexico else touched_main | touched_h).nonzero().squeeze(1)
        g = G[t] if G[t] is not None else torch.zeros_like(Wp[t])
        h = H[t] if H[t] is not None else torch.zeros_like(Wp[t])
        r = rows.tolist()
        sub = {n: [float(x) if v[t].dtype.is_floating_point else int(x) for x in v[t][rows].tolist()]
               for n, v in state.items()}
        # the paper-formula loops of tests/optim/reference.py: neither rules.py nor the kernel is involved
        new_w, sub, lams = ref_step(cfg, W[t][rows].double().tolist(), g[rows].tolist(), sub, step,
                                    h[rows].tolist(), touched_h[rows].tolist(), float(main.detach()),
                                    table=None if tables is None else tables[t], rows=r)
        if r:
            W[t][rows] = torch.tensor(new_w, dtype=W[t].dtype)
            for n, v in sub.items():
                state[n][t][rows] = torch.tensor(v, dtype=state[n][t].dtype)
        if cfg.lexico:
            lam_all.append(torch.tensor(lams, dtype=torch.float64))
    return float(main)


CONFIGS = {
    "cfsgd": RuleConfig(lr=0.1, adjustment_ub=2.0),
    "cfsgd_decay_warmup": RuleConfig(lr=0.1, counter_halflife=2.0, adjustment_iter=2, lr_max=0.08),
    "cfsgd_paper": RuleConfig(lr=0.1, adjustment_ub=2.0, counter_form="paper", horizon=6),
    "cfsgd_paper_decay_lexico": RuleConfig(lr=0.1, counter_halflife=3.0, counter_form="paper", horizon=6,
                                           lexico=True, lr_max=0.09),
    "cfsgd_lexico": RuleConfig(lr=0.1, lexico=True),
    "adagrad_lexico_clip": RuleConfig(step_rule="rowwise_adagrad", lr=0.1, lexico=True, lexico_h_clip=0.5,
                                      lexico_lambda_max=3.0),
    "cfsgd_lexico_plain": RuleConfig(lr=0.1, lexico=True, lexico_apply_to_all=False),
    "cfsgd_table_ub": RuleConfig(lr=0.05, ub_mode="table", adjustment_ub=1.5),
    "cfsgd_table_ub_geo_lexico": RuleConfig(lr=0.05, ub_mode="table", ub_rows="geometric", lexico=True),
    "cfsgd_table_ub_geo_floor": RuleConfig(lr=0.05, ub_mode="table", ub_rows="geometric", ub_row_floor=True,
                                           counter_halflife=3.0),
    "cfsgd_table_ub_paper_lexico": RuleConfig(lr=0.05, ub_mode="table", counter_form="paper", horizon=6,
                                              counter_halflife=3.0, lexico=True),
    # compact counters (2-byte and 1-byte approximate counters) on the default form, and with lexico
    "cfsgd_counter2_default": RuleConfig(lr=0.05, ub_mode="table", ub_rows="geometric", ub_row_floor=True,
                                         counter_bytes=2),
    "cfsgd_counter1_lexico_paper": RuleConfig(lr=0.1, counter_bytes=1, lexico=True, counter_form="paper",
                                              horizon=6),
}


@pytest.mark.parametrize("use_ext", [False, True])
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_matches_reference(name, pooling, weighted, use_ext, monkeypatch):
    if use_ext and kernel.load_extension() is None:
        pytest.skip("C++ extension unavailable here")
    if not use_ext:
        monkeypatch.setattr(kernel, "load_extension", lambda verbose=False: None)
    cfg = CONFIGS[name]
    tbe = build(cfg, pooling)
    W = [w.detach().double().clone() for w in tbe.split_embedding_weights()]
    state = {n: [s.detach().clone().double() if s.dtype.is_floating_point else s.detach().clone()
                 for s in tbe.split_state(n)] for n in cfg.state_names()}
    tables = [{"ub_sum": 0.0, "ub_count": 0} for _ in ROWS]
    for step in range(1, 5):
        batch = make_batch(step, weighted)
        out = tbe(*batch)
        # forward equals the reference pooling
        main, tr = loss_of(split_out(out))
        tbe.main_loss = float(main.detach())
        (main + tr).backward()
        loss_ref = reference_step(W, state, cfg, batch, step, pooling, tables)
        assert loss_ref == pytest.approx(float(main), rel=1e-5)
        for t, w in enumerate(tbe.split_embedding_weights()):
            torch.testing.assert_close(w.double(), W[t], rtol=1e-5, atol=1e-6)
        for n in cfg.state_names():
            for t, s in enumerate(tbe.split_state(n)):
                torch.testing.assert_close(s.double(), state[n][t].double(), rtol=1e-5, atol=1e-6)
        if cfg.table_ub:   # the per-table running mean of x_t, in float64 on both sides
            got = [float(v) for row in tbe.ub_stat.tolist() for v in row]
            want = [float(tb[k]) for tb in tables for k in ("ub_sum", "ub_count")]
            assert got == pytest.approx(want, rel=1e-5)
    assert int(tbe.step) == 4
    stats = tbe.last_stats
    assert stats["rows"].numel() == stats["updated"].numel()
    assert (stats["lambda"] is not None) == cfg.lexico


def test_no_grad_forward_does_not_advance_step():
    tbe = build(CONFIGS["cfsgd"])
    with torch.no_grad():
        tbe(*make_batch(0, False))
    assert int(tbe.step) == 0
    tbe.set_optimizer_step(41)
    out = tbe(*make_batch(0, False))
    out.sum().backward()
    assert int(tbe.step) == 42


def test_lexico_without_loss_fails_loudly():
    tbe = build(CONFIGS["cfsgd_lexico"])
    out = tbe(*make_batch(0, False))
    with pytest.raises(RuntimeError, match="set_main_loss"):
        out.sum().backward()


def _run_steps(tbe, batches):
    for idx, off, psw in batches:
        out = tbe(idx, off, psw)
        main, tr = loss_of(split_out(out))
        tbe.main_loss = float(main.detach())
        (main + tr).backward()
    return tbe


@pytest.mark.parametrize("name", ["cfsgd_decay_warmup", "cfsgd_lexico", "adagrad_lexico_clip"])
def test_sparse_sorted_path_matches_torch_path(name, monkeypatch):
    """Large tables with few touched rows take the C++ op's sort path (the small ones its slot
    scan); both must give what the pure-torch path (checked against float64 above) gives."""
    if kernel.load_extension() is None:
        pytest.skip("C++ extension unavailable here")
    monkeypatch.setattr(sys.modules[__name__], "ROWS", [5000, 20, 3000])
    batches = [make_batch(s, weighted=True) for s in range(1, 4)]
    cfg = CONFIGS[name]
    ext_tbe = _run_steps(build(cfg), batches)
    monkeypatch.setattr(kernel, "load_extension", lambda verbose=False: None)
    ref_tbe = _run_steps(build(cfg), batches)
    torch.testing.assert_close(ext_tbe.weights, ref_tbe.weights, rtol=1e-5, atol=1e-6)
    for n in cfg.state_names():
        torch.testing.assert_close(getattr(ext_tbe, n), getattr(ref_tbe, n), rtol=1e-5, atol=1e-6)
    keys = ext_tbe.last_stats["rows"]
    assert torch.equal(keys, torch.sort(keys).values), "rows are updated and reported in row order"
    assert torch.equal(torch.sort(keys).values, torch.sort(ref_tbe.last_stats["rows"]).values)


def test_out_of_range_index_fails_clearly_and_leaves_kernel_usable():
    if kernel.load_extension() is None:
        pytest.skip("C++ extension unavailable here")
    cfg = CONFIGS["cfsgd"]
    idx, off, psw = make_batch(3, weighted=False)
    grad = torch.ones(B, sum(DIMS[t] for _, t in FEATS))
    bad = idx.clone()
    bad[int(off[B])] = ROWS[1]  # first id of feature "b" (table 1) is one past its last row
    tbe, fresh = build(cfg), build(cfg)
    with pytest.raises(RuntimeError, match=rf"table 1: embedding index {ROWS[1]} out of range \[0, {ROWS[1]}\)"):
        tbe.update(bad, off, None, grad)
    # the failed call must not leave stale slots behind: the next step equals a fresh kernel's
    tbe.weights.copy_(fresh.weights)
    for n in cfg.state_names():
        getattr(tbe, n).copy_(getattr(fresh, n))
    tbe.step.copy_(fresh.step)
    tbe.update(idx, off, None, grad)
    fresh.update(idx, off, None, grad)
    torch.testing.assert_close(tbe.weights, fresh.weights, rtol=0, atol=0)
    torch.testing.assert_close(tbe.counter, fresh.counter, rtol=0, atol=0)


def test_counter_estimate_decodes_compact_levels():
    """kernel_stats reports counts, not levels: a compact counter's level goes through its count table."""
    cfg = CONFIGS["cfsgd_counter1_lexico_paper"]
    tbe = build(cfg)
    tbe.counter.copy_(torch.arange(tbe.counter.numel()) % 40)
    keys = torch.tensor([0, 5, 39, 41])
    want = rules.counter_tables(1)[0][torch.tensor([0, 5, 39, 1])]
    torch.testing.assert_close(tbe.counter_estimate(keys), want)
    plain = build(CONFIGS["cfsgd"])
    plain.counter.fill_(7.0)
    assert plain.counter_estimate(keys).tolist() == [7.0] * 4
