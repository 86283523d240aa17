"""The Triton update kernel (trainer/optim/triton_update.py) against the float64 formulas of
tests/optim/reference.py, for every rule, sum/mean pooling, per-sample weights, lexico on/off and
h-clip (the CONFIGS of test_kernel.py). Without a GPU it runs in Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1, set by tests/conftest.py before anything imports Triton); with one, on CUDA.
Batches are tiny: the interpreter runs every program in Python."""

import pytest
import torch

from tests.optim.test_kernel import B, CONFIGS, DIMS, FEATS, ROWS, loss_of, make_batch, reference_step, split_out
from trainer.optim import kernel, segments

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build(cfg, pooling="sum", device=DEVICE):
    tbe = kernel.TailrecTBE(ROWS, DIMS, [t for _, t in FEATS], [f.endswith("__shadow") for f, _ in FEATS],
                            cfg, pooling=pooling, device=device)
    torch.manual_seed(0)
    w = torch.empty_like(tbe.weights, device="cpu").uniform_(-0.5, 0.5)
    tbe.weights.copy_(w)
    return tbe


def on(batch, device):
    return tuple(None if x is None else x.to(device) for x in batch)


def run_against_reference(cfg, pooling, weighted, device, steps=3):
    tbe = build(cfg, pooling, device)
    W = [w.detach().double().cpu().clone() for w in tbe.split_embedding_weights()]
    state = {n: [s.detach().cpu().clone().double() if s.dtype.is_floating_point else s.detach().cpu().clone()
                 for s in tbe.split_state(n)] for n in cfg.state_names()}
    tables = [{"ub_sum": 0.0, "ub_count": 0} for _ in ROWS]
    for step in range(1, steps + 1):
        batch = make_batch(step, weighted)
        out = tbe(*on(batch, device))
        main, tr = loss_of(split_out(out.cpu()))
        main_d, tr_d = loss_of(split_out(out))
        tbe.main_loss = float(main.detach())
        (main_d + tr_d).backward()
        reference_step(W, state, cfg, batch, step, pooling, tables)
        if cfg.table_ub:   # the per-table running mean of x_t (ub_mode="table"), float64 on both sides
            got = [float(v) for row in tbe.ub_stat.tolist() for v in row]
            assert got == pytest.approx([float(tb[k]) for tb in tables for k in ("ub_sum", "ub_count")], rel=1e-5)
        for t, w in enumerate(tbe.split_embedding_weights()):
            torch.testing.assert_close(w.double().cpu(), W[t], rtol=1e-5, atol=1e-6)
        for n in cfg.state_names():
            for t, s in enumerate(tbe.split_state(n)):
                torch.testing.assert_close(s.double().cpu(), state[n][t].double(), rtol=1e-5, atol=1e-6)
    assert int(tbe.step) == steps
    return tbe


@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_matches_float64_reference(name, pooling, weighted, monkeypatch):
    monkeypatch.setenv("TAILREC_KERNEL", "triton")
    tbe = run_against_reference(CONFIGS[name], pooling, weighted, DEVICE)
    assert tbe.backend == "triton"
    st = tbe.last_stats
    assert (st["lambda"] is not None) == CONFIGS[name].lexico
    assert torch.equal(st["rows"], torch.sort(st["rows"]).values), "unique rows come out in row order"


@pytest.mark.parametrize("name", ["cfsgd_lexico", "adagrad_lexico_clip", "cfsgd_decay_warmup"])
def test_triton_and_cpp_report_the_same_rows_and_lambdas(name, monkeypatch):
    """Stats agree too (kernel_stats reads them): same unique rows, same updated flags, same lambda."""
    if kernel.load_extension() is None:
        pytest.skip("C++ extension unavailable here")
    cfg, batches = CONFIGS[name], [make_batch(s, weighted=True) for s in range(1, 3)]
    got = {}
    for backend in ("triton", "cpp"):
        monkeypatch.setenv("TAILREC_KERNEL", backend)
        tbe = build(cfg, "sum", torch.device("cpu"))
        for batch in batches:
            main, tr = loss_of(split_out(tbe(*batch)))
            tbe.main_loss = float(main.detach())
            (main + tr).backward()
        got[backend] = (tbe.last_stats, tbe.weights.clone())
    (st_t, w_t), (st_c, w_c) = got["triton"], got["cpp"]
    assert torch.equal(st_t["rows"], st_c["rows"]) and torch.equal(st_t["updated"], st_c["updated"])
    if cfg.lexico:
        torch.testing.assert_close(st_t["lambda"], st_c["lambda"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_t, w_c, rtol=1e-5, atol=1e-6)


def test_segments_cut_one_run_per_unique_row():
    """The sort/segment prep on its own: run starts, count and lookup weights, from a hand example."""
    meta = segments.FeatureMeta(feat_table=torch.tensor([0, 1]), feat_shadow=torch.tensor([False, True]),
                                feat_col=torch.tensor([0, 4]), row_off=torch.tensor([0, 10]),
                                w_off=torch.tensor([0, 40]), dim=torch.tensor([4, 4]), row_bounds=torch.tensor([0, 10, 20]))
    # B = 2 bags per feature: f0 = [3, 1], [3]; f1 = [], [2, 2, 5]
    idx = torch.tensor([3, 1, 3, 2, 2, 5])
    off = torch.tensor([0, 2, 3, 3, 6])
    grad = torch.zeros(2, 8)
    seg = segments.sort_lookups(idx, off, torch.tensor([1., 2., 3., 4., 5., 6.]), grad, meta, True, 20)
    assert seg.key.tolist() == [1, 3, 3, 12, 12, 15]
    assert int(seg.num_rows) == 4 and seg.seg_start.tolist() == [0, 1, 3, 5, 6, 6, 6]
    assert seg.shadow.tolist() == [0, 0, 0, 1, 1, 1]
    # mean pooling: psw / bag length; gradient slice = bag row x ldg + feature column
    torch.testing.assert_close(seg.weight, torch.tensor([2 / 2, 1 / 2, 3 / 1, 4 / 3, 5 / 3, 6 / 3]))
    assert seg.gaddr.tolist() == [0, 0, 8, 12, 12, 12]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU lane: pytest -m gpu)")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_on_cuda_matches_float64_reference(name, monkeypatch):
    monkeypatch.delenv("TAILREC_KERNEL", raising=False)   # auto: CUDA picks Triton
    for pooling, weighted in (("sum", True), ("mean", False)):
        assert run_against_reference(CONFIGS[name], pooling, weighted, torch.device("cuda")).backend == "triton"


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_a_column_slice_of_a_wider_gradient_is_read_in_place(backend, monkeypatch):
    """TorchRec hands each kernel its columns of one pooled gradient (a strided view): same update as
    from a contiguous copy."""
    if backend == "cpp" and kernel.load_extension() is None:
        pytest.skip("C++ extension unavailable here")
    monkeypatch.setenv("TAILREC_KERNEL", backend)
    cfg = CONFIGS["cfsgd_lexico"]
    idx, off, psw = make_batch(5, weighted=True)
    width = sum(DIMS[t] for _, t in FEATS)
    wide = torch.randn(B, width + 7, generator=torch.Generator().manual_seed(1))
    sliced, copied = build(cfg, "sum", torch.device("cpu")), build(cfg, "sum", torch.device("cpu"))
    for tbe, grad in ((sliced, wide[:, 3:3 + width]), (copied, wide[:, 3:3 + width].contiguous())):
        tbe.main_loss = 0.7
        tbe.update(idx, off, psw, grad)
    assert not wide[:, 3:3 + width].is_contiguous()
    torch.testing.assert_close(sliced.weights, copied.weights, rtol=0, atol=0)
    assert not torch.equal(sliced.weights, build(cfg, "sum", torch.device("cpu")).weights)


def test_forcing_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    from trainer.optim import triton_update

    monkeypatch.setenv("TAILREC_KERNEL", "triton")
    monkeypatch.setattr(triton_update, "interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        build(CONFIGS["cfsgd"], "sum", torch.device("cpu"))
    monkeypatch.setenv("TAILREC_KERNEL", "cuda")
    with pytest.raises(ValueError, match="TAILREC_KERNEL='cuda' is not one of"):
        build(CONFIGS["cfsgd"], "sum", torch.device("cpu"))
