"""rules.py against an independent float64 reference written row by row from the formulas
(docs/ALGORITHMS.md §1-3). Tolerance: rules run in float32, so rtol 1e-5 / atol 1e-6."""
import math

import pytest
import torch

from tests.optim.reference import ref_step
from trainer.optim import rules
from trainer.optim.rules import RuleConfig

RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------- helpers
def to_lists(t):
    return t.double().tolist()


def run_both(cfg, steps, n=12, d=5, seed=0, lexico_data=False, touch_p=0.6):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=gen)
    st = rules.init_state(cfg, n)
    W_ref = to_lists(W)
    st_ref = {k: [float(x) if k != "last_step" else int(x) for x in v.tolist()] for k, v in st.items()}
    all_lams = []
    tab = {"ub_sum": torch.zeros((), dtype=torch.float64), "ub_count": torch.zeros((), dtype=torch.float64)}
    tab_ref = {"ub_sum": 0.0, "ub_count": 0}
    for step in range(1, steps + 1):
        rows = (torch.rand(n, generator=gen) < touch_p).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        g = torch.randn(rows.numel(), d, generator=gen) * 0.3
        g[0] = 0.0 if lexico_data else g[0]  # a row with zero main gradient
        h = torch.randn(rows.numel(), d, generator=gen) if lexico_data else None
        has_h = (torch.rand(rows.numel(), generator=gen) < 0.5) if lexico_data else None
        loss = 0.7
        sub = {k: v[rows] for k, v in st.items()}
        res = rules.apply_step(cfg, W[rows], g, sub, step, h=h, has_h=has_h, loss=loss,
                               table_state=tab if cfg.table_ub else None)
        tab = res.table_state or tab
        W[rows] = res.rows
        for k, v in res.state.items():
            st[k][rows] = v
        # reference on the same rows
        r = rows.tolist()
        sub_ref = {k: [v[i] for i in r] for k, v in st_ref.items()}
        new_w, sub_ref, lams = ref_step(cfg, [W_ref[i] for i in r], to_lists(g), sub_ref, step,
                                        None if h is None else to_lists(h),
                                        None if has_h is None else has_h.tolist(), loss, table=tab_ref)
        for j, i in enumerate(r):
            W_ref[i] = new_w[j]
            for k in st_ref:
                st_ref[k][i] = sub_ref[k][j]
        if res.lam is not None:
            torch.testing.assert_close(res.lam.double(), torch.tensor(lams, dtype=torch.float64),
                                       rtol=RTOL, atol=ATOL)
            all_lams.append(res.lam)
    return W, st, torch.tensor(W_ref, dtype=torch.float64), st_ref


def check(cfg, **kw):
    W, st, W_ref, st_ref = run_both(cfg, **kw)
    torch.testing.assert_close(W.double(), W_ref, rtol=RTOL, atol=ATOL)
    for k, v in st.items():
        torch.testing.assert_close(v.double(), torch.tensor(st_ref[k], dtype=torch.float64),
                                   rtol=RTOL, atol=ATOL)
    return st


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("hl", [-1.0, 0.0, 2.0, 5.5])
def test_cfsgd_counters_with_gaps(hl):
    cfg = RuleConfig(step_rule="cfsgd", lr=0.1, adjustment_ub=2.0, counter_halflife=hl)
    st = check(cfg, steps=12, touch_p=0.4)  # p=0.4: rows skip steps -> delta > 1
    assert set(st) == ({"counter", "last_step"} if hl > 0 else {"counter"})


@pytest.mark.parametrize("hl", [-1.0, 3.0])
@pytest.mark.parametrize("lr_max", [math.inf, 0.05])
def test_cfsgd_paper_form_matches_the_papers_formula(hl, lr_max):
    cfg = RuleConfig(step_rule="cfsgd", lr=0.1, adjustment_ub=2.0, counter_halflife=hl, counter_form="paper",
                     horizon=40, lr_max=lr_max)
    check(cfg, steps=12, touch_p=0.4)


def test_paper_form_keeps_a_steady_rows_step_constant_and_reduces_to_fbgemm_at_t_equals_T():
    """The property that separates the forms: a row seen every step keeps eta = lr / sqrt(ub T) under the
    paper form, while FBGEMM's decays like 1/sqrt(t); at t = T both agree."""
    paper = RuleConfig(step_rule="cfsgd", lr=1.0, counter_form="paper", horizon=100)
    fb = RuleConfig(step_rule="cfsgd", lr=1.0)
    for t in (1, 10, 100):
        c = torch.tensor([float(t)])                       # seen at every one of t steps
        assert rules.cfsgd_lr(paper, c, t).item() == pytest.approx(0.1, rel=1e-6)
        assert rules.cfsgd_lr(fb, c, t).item() == pytest.approx(1 / math.sqrt(t), rel=1e-6)
    c = torch.tensor([3.0, 50.0])
    torch.testing.assert_close(rules.cfsgd_lr(paper, c, 100), rules.cfsgd_lr(fb, c, 100))
    with pytest.raises(ValueError, match="counter_form"):
        RuleConfig(counter_form="adam")


@pytest.mark.parametrize("form", ["fbgemm", "paper"])
@pytest.mark.parametrize("lexico", [False, True])
@pytest.mark.parametrize("rows,floor", [("arithmetic", False), ("geometric", False), ("geometric", True)])
def test_cfsgd_table_ub_matches_the_formula(form, lexico, rows, floor):
    """ub_mode="table": ub = adjustment_ub x mean over steps of x_t, x_t the arithmetic mean over updated rows
    of mean_d d^2, or its geometric mean over the rows with d != 0 (lexico_data has a g = 0 row)."""
    check(RuleConfig(lr=0.3, adjustment_ub=1.5, ub_mode="table", counter_form=form, horizon=8 if form == "paper" else 0,
                     lexico=lexico, counter_halflife=4.0, ub_rows=rows, ub_row_floor=floor), steps=8, lexico_data=lexico)


def test_geometric_rows_follow_the_typical_row_not_the_largest():
    """One row with a 100x gradient: the arithmetic x_t follows it, the geometric one stays near the rest."""
    d = torch.tensor([[100.0, 100.0]] + [[1.0, 1.0]] * 9)
    z = {"ub_sum": torch.zeros((), dtype=torch.float64), "ub_count": torch.zeros((), dtype=torch.float64)}
    ari, _ = rules.table_ub_update(RuleConfig(ub_mode="table"), z, d)
    geo, st = rules.table_ub_update(RuleConfig(ub_mode="table", ub_rows="geometric"), z, d)
    assert float(ari) == pytest.approx((1e4 + 9) / 10)
    assert float(geo) == pytest.approx(math.exp((math.log(1e4) + 9 * 0.0) / 10))   # 10**0.4 = 2.51
    zero, st0 = rules.table_ub_update(RuleConfig(ub_mode="table", ub_rows="geometric"), z, torch.zeros(3, 2))
    assert float(st0["ub_count"]) == 0                # no non-zero row: the estimate is left as it is


@pytest.mark.parametrize("rows,floor", [("arithmetic", False), ("geometric", True)])
def test_table_ub_makes_the_step_independent_of_the_gradient_scale(rows, floor):
    """The point of ub_mode="table": scaling every gradient by s (a batch 1/s as large, a loss s times
    larger, s ranks summing their means) leaves the update unchanged; with a fixed ub it scales by s."""
    outs = {}
    for mode in ("fixed", "table"):
        for scale in (1.0, 8.0):
            cfg = RuleConfig(lr=0.2, ub_mode=mode, ub_rows=rows, ub_row_floor=floor)
            st, tab = rules.init_state(cfg, 4), {"ub_sum": torch.zeros((), dtype=torch.float64),
                                                 "ub_count": torch.zeros((), dtype=torch.float64)}
            W = torch.zeros(4, 3)
            gen = torch.Generator().manual_seed(3)
            for step in range(1, 6):
                g = torch.randn(4, 3, generator=gen) * scale
                res = rules.apply_step(cfg, W, g, st, step, table_state=tab if cfg.table_ub else None)
                W, st, tab = res.rows, res.state, res.table_state or tab
            outs[mode, scale] = W
    torch.testing.assert_close(outs["table", 8.0], outs["table", 1.0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(outs["fixed", 8.0], 8.0 * outs["fixed", 1.0], rtol=1e-5, atol=1e-6)


def test_cfsgd_lr_max_and_warmup():
    cfg = RuleConfig(step_rule="cfsgd", lr=0.5, lr_max=0.2, adjustment_iter=4, counter_halflife=3.0)
    st = check(cfg, steps=9)
    assert set(st) == {"counter", "last_step", "adagrad_sum"}
    assert cfg.state_bytes_per_row() == 12


def test_rowwise_adagrad():
    check(RuleConfig(step_rule="rowwise_adagrad", lr=0.05), steps=6)


@pytest.mark.parametrize("apply_to_all", [True, False])
@pytest.mark.parametrize("h_clip", [0.0, 0.3])
@pytest.mark.parametrize("rule", ["cfsgd", "rowwise_adagrad"])
def test_lexico_matches_reference(apply_to_all, h_clip, rule):
    cfg = RuleConfig(step_rule=rule, lr=0.1, lexico=True, lexico_h_clip=h_clip,
                     lexico_apply_to_all=apply_to_all, lexico_lambda_max=10.0)
    check(cfg, steps=5, lexico_data=True)


def test_barrier_constraint_holds_per_row():
    gen = torch.Generator().manual_seed(3)
    n, d = 500, 8
    g = torch.randn(n, d, generator=gen) * torch.rand(n, 1, generator=gen)
    h = torch.randn(n, d, generator=gen) * 3
    has_h = torch.rand(n, generator=gen) < 0.7
    cfg = RuleConfig(lexico=True, lexico_lambda_max=math.inf)
    res = rules.lexico_direction(cfg, g, h, has_h, loss=0.4)
    lhs = (res.direction * g).sum(1)
    assert (lhs >= res.phi * (1 - 1e-5) - 1e-6).all()
    assert (res.lam >= 0).all()
    # with a cap, rows below the cap still satisfy it exactly
    capped = rules.lexico_direction(RuleConfig(lexico=True, lexico_lambda_max=1.0), g, h, has_h, 0.4)
    free = capped.lam < 1.0
    assert ((capped.direction * g).sum(1)[free] >= capped.phi[free] * (1 - 1e-5) - 1e-6).all()


def _conflicting(n=20000, d=8, seed=11):
    """Per-row main gradients of a batch-mean loss are small next to the transfer gradient, and often point
    against it: the regime in which a lambda cap binds."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, d, generator=gen) * torch.rand(n, 1, generator=gen) * 0.05
    h = torch.randn(n, d, generator=gen) - 0.5 * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    has_h = torch.rand(n, generator=gen) < 0.8
    return g, h, has_h


def _rounding(res, g, h):
    """float32 rounding of <d, g> = <h, g> + lambda ||g||^2 (a difference of terms much larger than phi)."""
    return 4e-6 * ((h * g).sum(1).abs() + res.lam * g.square().sum(1) + res.phi)   # ~ 32 float32 ulps


def test_default_lexico_keeps_the_barrier_on_every_row():
    g, h, has_h = _conflicting()
    for cfg in (RuleConfig(lexico=True), RuleConfig(lexico=True, lexico_h_clip=1.0),
                RuleConfig(lexico=True, lexico_apply_to_all=False)):
        res = rules.lexico_direction(cfg, g, h, has_h, loss=0.45)
        lhs = (res.direction * g).sum(1)
        plain = ~has_h if not cfg.lexico_apply_to_all else torch.zeros_like(has_h)
        # every certified row: <d_i, g_i> >= phi_i; rows without h that take the plain step (the
        # apply_to_all=False option) have d = g: a plain descent step, <d, g> = ||g||^2 > 0
        ok = lhs >= res.phi - _rounding(res, g, h)
        assert ok[~plain].all(), cfg
        assert torch.equal(res.direction[plain], g[plain]) and (lhs[plain] > 0).all()


def test_a_lambda_cap_breaks_the_barrier_which_is_why_none_is_the_default():
    g, h, has_h = _conflicting()
    capped = rules.lexico_direction(RuleConfig(lexico=True, lexico_lambda_max=10.0), g, h, has_h, loss=0.45)
    lhs = (capped.direction * g).sum(1)
    violated = lhs < capped.phi - _rounding(capped, g, h)
    assert violated.sum() > 50 and (lhs[violated] < 0).sum() > 10   # some capped steps even raise the loss
    assert math.isinf(RuleConfig().lexico_lambda_max)


def test_h_clip_bounds_lambda_without_a_cap():
    """||h|| <= c ||g|| gives lambda <= alpha + c: the step stays bounded while the barrier holds."""
    g, h, has_h = _conflicting()
    res = rules.lexico_direction(RuleConfig(lexico=True, lexico_h_clip=0.5), g, h, has_h, loss=0.45)
    assert res.lam.max() <= 2.0 + 0.5 + 1e-5


def test_first_order_column_is_part_of_the_row_the_barrier_protects():
    """FM/DeepFM rows carry the first-order weight after the factor columns; the transfer loss sees only
    the factor part (h = 0 there) but the update moves the whole row, so the barrier is computed on the
    whole row: <d, g> over every column >= phi. Computing it on the factor columns alone would not be."""
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(300, 20, generator=gen) * 0.01
    g[:, 16] *= 30                                   # the first-order weight's gradient dominates
    g[:, 17:] = 0                                    # padding columns
    h = torch.zeros_like(g)
    h[:, :16] = torch.randn(300, 16, generator=gen)  # factor part only
    res = rules.lexico_direction(RuleConfig(lexico=True), g, h, torch.ones(300, dtype=torch.bool), loss=0.5)
    full = (res.direction * g).sum(1)
    assert (full >= res.phi - _rounding(res, g, h)).all()
    # factor-only norms would give a lambda too small for the full row on some rows
    gf = g[:, :16]
    phi_f = 2.0 * torch.clamp(gf.square().sum(1), max=0.5)
    lam_f = ((phi_f - (h[:, :16] * gf).sum(1)) / gf.square().sum(1)).clamp_min(0)
    d_f = h + lam_f.unsqueeze(1) * g
    assert ((d_f * g).sum(1) < 0.99 * res.phi).sum() > 10


def test_lexico_edge_cases():
    cfg = RuleConfig(lexico=True, lexico_alpha=2.0)
    g = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.1, 0.0], [3.0, 0.0]])
    h = torch.tensor([[5.0, 5.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    has_h = torch.tensor([True, False, False, True])
    res = rules.lexico_direction(cfg, g, h, has_h, loss=0.5)
    # ||g||=0 with h != 0: h masked, nothing applied
    assert res.direction[0].abs().max() == 0 and res.lam[0] == 0
    # no transfer gradient, ||g||^2 = 0.01 << loss: lambda = alpha * min(1, loss/||g||^2) = 2
    assert res.lam[1].item() == pytest.approx(2.0)
    # ||g||^2 = 9 > loss: phi = 2*0.5=1, lambda = (1 - 3)/9 < 0 -> 0: pure h
    assert res.lam[3] == 0 and torch.equal(res.direction[3], h[3])
    plain = rules.lexico_direction(RuleConfig(lexico=True, lexico_apply_to_all=False), g, h, has_h, 0.5)
    assert torch.equal(plain.direction[1], g[1]) and plain.lam[1] == 1


def test_rule_config_from_emb_optim_config():
    from trainer.config import EmbOptimConfig

    rc = rules.rule_config_from(EmbOptimConfig(name="cfsgd", lr=0.3, counter_halflife=10, lexico=True))
    assert rc.step_rule == "cfsgd" and rc.lr == 0.3 and rc.lexico and rc.state_bytes_per_row() == 8
    hash(rc)  # must be hashable (TorchRec groups tables by fused_params)
    with pytest.raises(ValueError):
        rules.rule_config_from(EmbOptimConfig(name="exact_sgd"))


# ---------------------------------------------------------------- compact (approximate) counters
def test_counter_hash_is_the_documented_hash():
    from tests.optim.reference import ref_counter_hash

    rows = torch.tensor([0, 1, 7, 123456, 2**32 - 1, 2**32 + 5, 2**40 + 3])
    for step in (1, 2, 1000, 2**31 + 7):
        got = rules.counter_hash(rows, step).tolist()
        assert got == [ref_counter_hash(int(r), step) for r in rows.tolist()]


@pytest.mark.parametrize("counter_bytes,rel_std", [(2, 0.018), (1, 0.21)])
def test_compact_counter_is_unbiased_with_the_stated_spread(counter_bytes, rel_std):
    """E[n(k)] = the true count (Morris); relative std ~ sqrt((b - 1) / 2), as documented."""
    cfg = RuleConfig(counter_bytes=counter_bytes)
    rows, level = torch.arange(20000), rules.init_state(cfg, 20000)["counter"]
    for step in range(1, 301):
        level, c = rules.update_compact_counter(cfg, level, rows, step)
    assert level.dtype == {2: torch.int16, 1: torch.uint8}[counter_bytes]
    assert float(c.mean()) / 300 == pytest.approx(1.0, abs=5 * rel_std / math.sqrt(20000))
    assert float(c.std() / c.mean()) == pytest.approx(rel_std, rel=0.15)


def test_compact_counter_levels_decode_and_saturate():
    for nbytes, (kmax, r) in rules.COUNTER_LEVELS.items():
        count, thr = rules.counter_tables(nbytes)
        k = torch.arange(kmax + 1, dtype=torch.float64)
        want = (2.0 ** (k / r) - 1) / (2.0 ** (1 / r) - 1)
        torch.testing.assert_close(count.double(), want, rtol=1e-6, atol=0)
        assert int(thr[0]) == 2**24 and int(thr[-1]) == 0       # level 0 always rises; the top never does
        cfg = RuleConfig(counter_bytes=nbytes)
        top = torch.full((50,), kmax, dtype=rules.state_dtype(cfg, "counter"))
        lv, c = rules.update_compact_counter(cfg, top, torch.arange(50), 9)
        assert torch.equal(lv, top) and torch.all(c == count[kmax])


def test_compact_counter_state_bytes_and_validation():
    assert RuleConfig(counter_bytes=2).state_bytes_per_row() == 2
    assert RuleConfig(counter_bytes=1).state_bytes_per_row() == 1
    assert RuleConfig(counter_bytes=1, adjustment_iter=3).state_bytes_per_row() == 5   # + the float32 Adagrad sum
    assert RuleConfig().state_bytes_per_row() == 4
    with pytest.raises(ValueError, match="counter_bytes 3"):
        RuleConfig(counter_bytes=3)
    with pytest.raises(ValueError, match="counter_halflife < 0"):
        RuleConfig(counter_bytes=2, counter_halflife=4.0)
    with pytest.raises(ValueError, match="row_ids"):
        cfg = RuleConfig(counter_bytes=1)
        rules.apply_step(cfg, torch.zeros(2, 3), torch.ones(2, 3), rules.init_state(cfg, 2), 1)
