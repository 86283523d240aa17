"""Transfer losses (trainer/optim/transfer_loss.py) against independent brute force and behavioural checks."""
from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch

from trainer.config import TransferConfig
from trainer.optim.transfer_loss import (
    CosRegLoss,
    FrageLoss,
    MMDLoss,
    TransferLoss,
    build_transfer_loss,
    median_pairwise_distance,
    split_rows,
)

torch.set_num_threads(1)


def _rows(n, d, shift=0.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + shift
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------- MMD
def _mmd_brute(s, t, scales):
    """MMD^2_u by the docs/ALGORITHMS.md §4 formula: python loops, float64, statistics.median_low."""
    s = [list(map(float, r)) for r in s]
    t = [list(map(float, r)) for r in t]
    pts = s + t

    def dist(a, b):
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))

    sigma0 = statistics.median_low([dist(a, b) for a, b in itertools.combinations(pts, 2)])

    def k(a, b):
        d2 = dist(a, b) ** 2
        return sum(math.exp(-d2 / (2 * (c * sigma0) ** 2)) for c in scales)

    m, n = len(s), len(t)
    ss = sum(k(s[i], s[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    tt = sum(k(t[i], t[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    st = sum(k(a, b) for a in s for b in t) * 2 / (m * n)
    return ss + tt - st, sigma0


@pytest.mark.parametrize("scales", [[0.5, 1.0, 2.0], [1.0], [0.25, 4.0]])
def test_mmd_matches_bruteforce(scales):
    s, t = _rows(6, 4, seed=1, dtype=torch.float64), _rows(9, 4, shift=0.7, seed=2, dtype=torch.float64)
    want, sigma0 = _mmd_brute(s, t, scales)
    mod = MMDLoss(scales)
    got = mod.loss(s, t)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert mod.metrics()["mmd_sigma0"] == pytest.approx(sigma0, rel=1e-9)
    # float32 path agrees to float32 precision.
    assert mod.loss(s.float(), t.float()).item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_mmd_same_vs_shifted_distribution():
    mod = MMDLoss()
    s = _rows(200, 8, seed=3)
    same = mod.loss(s, _rows(200, 8, seed=4)).item()
    shifted = mod.loss(s, _rows(200, 8, shift=1.0, seed=4)).item()
    assert abs(same) < 0.02       # unbiased: fluctuates around 0, can be slightly negative
    assert shifted > 0.3
    assert shifted > 20 * abs(same)


def test_mmd_gradient_moves_target_toward_source():
    mod = MMDLoss()
    s = _rows(64, 8, seed=5)
    s.requires_grad_(True)
    t = _rows(64, 8, shift=1.5, seed=6).requires_grad_(True)
    opt = torch.optim.SGD([t], lr=20.0)
    first = mod.loss(s, t).item()
    gap0 = (t.mean(0) - s.mean(0)).norm().item()
    for _ in range(15):
        opt.zero_grad()
        mod.loss(s, t).backward()
        opt.step()
    assert mod.loss(s, t).item() < 0.5 * first
    assert (t.mean(0) - s.mean(0)).norm().item() < 0.7 * gap0
    assert s.grad is None         # source is the reference: never pulled


@pytest.mark.parametrize("m,n", [(0, 5), (1, 5), (5, 1), (5, 0), (0, 0)])
def test_mmd_too_few_rows_is_differentiable_zero(m, n):
    s = _rows(m, 3, seed=7)
    t = _rows(n, 3, seed=8).requires_grad_(True)
    out = MMDLoss().loss(s, t)
    assert out.item() == 0.0
    out.backward()
    assert t.grad is not None and torch.all(t.grad == 0)


def test_mmd_identical_points_no_nan():
    s = torch.ones(4, 3)
    t = torch.ones(4, 3, requires_grad=True)
    out = MMDLoss().loss(s, t)
    out.backward()
    assert out.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(t.grad).all()


def test_median_subsample_is_deterministic_and_close():
    x = _rows(3000, 4, seed=9)
    full = median_pairwise_distance(x, max_points=10_000).item()
    sub = median_pairwise_distance(x, max_points=500).item()
    assert sub == median_pairwise_distance(x, max_points=500).item()
    assert sub == pytest.approx(full, rel=0.05)


# -------------------------------------------------------------------------------------------- CosReg
def _cos_brute(rows):
    rows = rows.double()
    n = rows.shape[0]
    tot = 0.0
    for i in range(n):
        for j in range(n):
            a, b = rows[i], rows[j]
            tot += float(a @ b / (a.norm() * b.norm()))
    return tot / n**2


def test_cosreg_closed_form_equals_bruteforce():
    s, t = _rows(5, 6, shift=0.3, seed=10), _rows(7, 6, shift=0.5, seed=11)
    assert CosRegLoss().loss(s, t).item() == pytest.approx(_cos_brute(t), rel=1e-5)
    both = CosRegLoss(include_source=True).loss(s, t).item()
    assert both == pytest.approx(_cos_brute(torch.cat([t, s])), rel=1e-5)


def test_cosreg_paper_form_is_the_mean_over_distinct_pairs():
    """Paper form: (1/(N(N-1))) sum_{i != j} cos(w_i, w_j) over target and source rows, float64 brute force;
    the gradient reaches the target rows only."""
    s, t = _rows(5, 6, shift=0.3, seed=14).double(), _rows(7, 6, shift=0.5, seed=15).double()
    rows = torch.cat([t, s])
    n = rows.shape[0]
    want = sum(float(rows[i] @ rows[j] / (rows[i].norm() * rows[j].norm()))
               for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    w = t.clone().requires_grad_(True)
    src = s.clone().requires_grad_(True)
    got = CosRegLoss(form="paper").loss(src, w)
    assert got.item() == pytest.approx(want, rel=1e-10)
    got.backward()
    assert src.grad is None and w.grad is not None and float(w.grad.abs().sum()) > 0
    # it differs from the batch-mean form (diagonal included, target rows only) on the same rows
    assert CosRegLoss().loss(s, t).item() != pytest.approx(want, rel=1e-3)
    with pytest.raises(ValueError, match="cosreg form"):
        CosRegLoss(form="nope")


def test_cosreg_gradient_decreases_it_and_spares_source():
    s = _rows(16, 8, shift=1.0, seed=12).requires_grad_(True)
    t = _rows(32, 8, shift=1.0, seed=13).requires_grad_(True)
    for include_source in (False, True):
        mod = CosRegLoss(include_source=include_source)
        w = t.detach().clone().requires_grad_(True)
        opt = torch.optim.SGD([w], lr=50.0)   # grad ~ 1/(N ||w||): needs a large lr
        first = mod.loss(s, w).item()
        for _ in range(20):
            opt.zero_grad()
            mod.loss(s, w).backward()
            opt.step()
        assert mod.loss(s, w).item() < 0.3 * first
    assert s.grad is None


def test_cosreg_empty_target():
    t = torch.zeros(0, 4, requires_grad=True)
    out = CosRegLoss(include_source=True).loss(_rows(3, 4), t)
    out.backward()
    assert out.item() == 0.0


# --------------------------------------------------------------------------------------------- FRAGE
def _separable(d=8, m=64, n=96, seed=14):
    e1 = torch.zeros(d)
    e1[0] = 1.0
    return _rows(m, d, seed=seed) * 0.5 + 2 * e1, _rows(n, d, seed=seed + 1) * 0.5 - 2 * e1


def test_frage_discriminator_learns_then_generator_fools_it():
    s, t = _separable()
    mod = FrageLoss(dim=8, lr=0.1, seed=0)
    accs = [mod.discriminator_step(s, t) for _ in range(100)]
    assert accs[-1] > 0.9
    assert mod.metrics()["frage_d_acc"] == accs[-1]
    assert mod.d_steps == 100

    w = t.clone().requires_grad_(True)
    d_before = [p.detach().clone() for p in mod.discriminator.parameters()]
    with torch.no_grad():
        acc_before = (mod.discriminator(w).argmax(1) == 1).float().mean().item()
    opt = torch.optim.SGD([w], lr=5.0)
    for _ in range(30):           # D frozen: only generator steps on the target rows
        opt.zero_grad()
        mod.loss(s, w).backward()
        opt.step()
    with torch.no_grad():
        acc_after = (mod.discriminator(w).argmax(1) == 1).float().mean().item()
    assert acc_before > 0.9 and acc_after < 0.5
    # Generator steps never move D (it is only updated by discriminator_step).
    assert all(torch.equal(a, b) for a, b in zip(d_before, mod.discriminator.parameters()))


def test_frage_generator_gives_no_grad_to_discriminator_or_source():
    s, t = _separable()
    mod = FrageLoss(dim=8, seed=0)
    s.requires_grad_(True)
    t.requires_grad_(True)
    mod.loss(s, t).backward()
    assert s.grad is None
    assert t.grad is not None and t.grad.abs().sum() > 0
    assert all(p.grad is None for p in mod.discriminator.parameters())


def test_frage_init_and_architecture():
    mod = FrageLoss(dim=5, seed=1)
    assert isinstance(mod.discriminator, torch.nn.Linear) and mod.discriminator.out_features == 2
    for p in mod.discriminator.parameters():
        assert p.abs().max() <= 0.1
    mlp = FrageLoss(dim=5, hidden=7, seed=1)
    assert [tuple(p.shape) for p in mlp.discriminator.parameters()] == [(7, 5), (7,), (2, 7), (2,)]
    s, t = _separable(d=5)
    accs = [mlp.discriminator_step(s, t) for _ in range(150)]
    assert accs[-1] > 0.9


def test_frage_after_step_runs_exactly_one_d_step():
    s, t = _separable()
    mod = FrageLoss(dim=8, seed=0)
    mod.loss(s, t)
    mod.after_step()              # no explicit D step this step -> uses cached rows
    assert mod.d_steps == 1
    mod.discriminator_step(s, t)  # explicit (D before or after loss): after_step must not add another
    mod.loss(s, t)
    mod.after_step()
    assert mod.d_steps == 2
    mod.after_step()              # no loss() and no rows: nothing to learn from
    assert mod.d_steps == 2


def test_frage_one_sided_batch():
    s, t = _separable()
    mod = FrageLoss(dim=8, seed=0)
    assert 0.0 <= mod.discriminator_step(s[:0], t) <= 1.0
    assert math.isnan(mod.discriminator_step(s[:0], t[:0]))
    out = mod.loss(s, t[:0].requires_grad_(True))
    assert out.item() == 0.0


def test_frage_state_dict_roundtrip_and_determinism():
    s, t = _separable()
    cfg = TransferConfig(loss="frage", frage_lr=0.05)
    a = build_transfer_loss(cfg, 8, "cpu", seed=3)
    b = build_transfer_loss(cfg, 8, "cpu", seed=3)
    for _ in range(5):
        assert a.discriminator_step(s, t) == b.discriminator_step(s, t)
    assert torch.equal(a.loss(s, t), b.loss(s, t))
    c = build_transfer_loss(cfg, 8, "cpu", seed=4)
    assert not torch.equal(c.discriminator.weight, a.discriminator.weight)
    c.load_state_dict(a.state_dict())
    assert c.d_steps == 5
    assert torch.equal(c.discriminator.weight, a.discriminator.weight)
    a.discriminator_step(s, t)
    c.discriminator_step(s, t)
    assert torch.equal(c.discriminator.weight, a.discriminator.weight)
    assert c.optimizer.param_groups[0]["lr"] == 0.05


def test_discriminator_not_in_model_parameters():
    model = torch.nn.Embedding(10, 8)
    mod = build_transfer_loss(TransferConfig(loss="frage"), 8, "cpu", seed=0)
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) not in model_params for p in mod.parameters())
    assert len(list(mod.parameters())) == 2


# ------------------------------------------------------------------------------------------- shared
@pytest.mark.parametrize("name", ["mmd", "cosreg", "frage"])
def test_factory_no_source_grad_and_metrics(name):
    cfg = TransferConfig(loss=name)
    mod = build_transfer_loss(cfg, 8, "cpu", seed=0)
    assert isinstance(mod, TransferLoss) and mod.name == name
    s, t = _separable()
    s.requires_grad_(True)
    t.requires_grad_(True)
    out = mod(s, t)
    assert out.dim() == 0 and torch.isfinite(out)
    out.backward()
    assert s.grad is None and t.grad is not None
    mod.after_step()
    assert mod.metrics()["transfer_loss"] == pytest.approx(out.item())


@pytest.mark.parametrize("name", ["mmd", "cosreg", "frage"])
def test_scale_does_not_grow_with_batch(name):
    # Duplicating every row doubles the batch but not the loss (means, not sums).
    mod = build_transfer_loss(TransferConfig(loss=name), 8, "cpu", seed=0)
    s, t = _separable()
    small = mod.loss(s, t).item()
    big = mod.loss(torch.cat([s, s]), torch.cat([t, t])).item()
    tol = 0.1 if name == "mmd" else 1e-5   # MMD_u's diagonal exclusion shifts it a little
    assert big == pytest.approx(small, rel=tol)


def test_factory_rejects_unknown():
    cfg = TransferConfig()
    cfg.loss = "wasserstein"
    with pytest.raises(ValueError):
        build_transfer_loss(cfg, 8, "cpu")


def test_mmd_from_config_uses_scales():
    mod = build_transfer_loss(TransferConfig(loss="mmd", mmd_sigma_scales=[1.0, 3.0]), 4, "cpu")
    assert mod.sigma_scales == [1.0, 3.0]


# ----------------------------------------------------------------------------------------- split_rows
def test_split_rows():
    is_source = torch.tensor([True, True, False, False, False, False])
    in_target = torch.tensor([True, False, True, False, True, True])   # id 0 both: source wins
    ids = torch.tensor([5, 0, 3, 2, 1])
    src, tgt = split_rows(ids, is_source, in_target)
    assert src.tolist() == [False, True, False, False, True]
    assert tgt.tolist() == [True, False, False, True, False]
    src2, tgt2 = split_rows(ids, is_source)
    assert src2.tolist() == src.tolist()
    assert tgt2.tolist() == [True, False, True, True, False]
    assert not (src & tgt).any()
    e_src, e_tgt = split_rows(ids[:0], is_source, in_target)
    assert e_src.numel() == 0 and e_tgt.numel() == 0
    with pytest.raises(IndexError):
        split_rows(torch.tensor([6]), is_source)
    with pytest.raises(TypeError):
        split_rows(ids, is_source.long())


def test_neighbor_loss_pulls_each_row_toward_its_own_anchor_only():
    from trainer.optim.transfer_loss import NeighborLoss

    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    mod = NeighborLoss()
    out = mod.loss(a, t)
    # float64 by hand: 1/2 (||t0 - a0||^2 + ||t1 - a1||^2) / 2 = 1/2 (1 + 2) / 2
    assert out.item() == pytest.approx(0.75, rel=1e-12)
    out.backward()
    torch.testing.assert_close(t.grad, (t - a).detach() / 2)     # d/dt_j = (t_j - a_j) / n
    assert a.grad is None                                        # anchors are detached
    assert mod.paired and mod.loss(a[:0], t[:0]).item() == 0.0
    w = torch.tensor([0.5, 0.1], dtype=torch.float64)      # per-row strength: (0.5 * 1/2 + 0.1 * 1) / 2
    assert mod.loss(a, t.detach(), w).item() == pytest.approx((0.5 * 0.5 + 0.1 * 1.0) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="pairs rows"):
        mod.loss(a, t[:1])
