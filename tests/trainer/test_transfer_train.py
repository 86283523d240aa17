"""Harmless transfer in the trainer: shadow features, domains, the TransferTerm, config wiring, a real
FRAGE run whose discriminator survives a resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from trainer.config import Config, TableConfig, EmbOptimConfig
from trainer.config_base import ConfigError
from trainer.train_module import TransferTerm, _first_rows
from trainer.transfer_wiring import (FeatureDomain, _kjt_with_shadows, planted_groups, prepare_config,
                                    shadow_name, table_feature_names)
from tests.helpers import results, run_trainer


def _kjt():
    # 4 examples; movie_id single-valued (example 2 has none), genres multi-valued
    return KeyedJaggedTensor(keys=["movie_id", "genres"], values=torch.tensor([5, 1, 7, 3, 3, 4, 5]),
                             lengths=torch.tensor([1, 1, 0, 1, 1, 2, 0, 1]), stride=4)


def _domain(n=10):
    is_source = torch.zeros(n, dtype=torch.bool)
    is_source[[1, 3]] = True
    in_target = torch.zeros(n, dtype=torch.bool)
    in_target[[5, 7]] = True
    return FeatureDomain("movie_id", 2, is_source, in_target)


def test_shadow_feature_holds_target_ids_in_training_and_nothing_in_eval():
    kjt = _kjt()
    out = _kjt_with_shadows(kjt, {"movie_id": _domain()}, train=True)
    assert out.keys() == ["movie_id", "genres", "movie_id__shadow"]
    sh = out["movie_id__shadow"]
    assert sh.lengths().tolist() == [1, 0, 0, 1] and sh.values().tolist() == [5, 7]
    assert out["genres"].values().tolist() == kjt["genres"].values().tolist()
    ev = _kjt_with_shadows(kjt, {"movie_id": _domain()}, train=False)
    assert ev["movie_id__shadow"].lengths().tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="single-valued"):
        _kjt_with_shadows(KeyedJaggedTensor(keys=["movie_id"], values=torch.tensor([5, 7]),
                                            lengths=torch.tensor([2]), stride=1), {"movie_id": _domain()}, True)


def test_first_rows():
    uniq, first = _first_rows(torch.tensor([7, 3, 7, 9, 3]), torch.tensor([1, 0, 1, 1, 1, 1]))
    assert uniq.tolist() == [3, 7, 9] and first.tolist() == [2, 0, 4]


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, src, tgt):
        self.calls.append((src, tgt))
        return (tgt ** 2).sum() + 0 * src.sum()


class _RT:
    def __init__(self, dom, coef):
        self.domains, self.coef, self.lexico, self.dmp = {"movie_id": dom}, coef, False, None
        self.losses = {"movie_id": _Recorder()}


def test_transfer_term_uses_one_shadow_row_per_target_id_and_detached_source_rows():
    dom = _domain()
    kjt = _kjt_with_shadows(KeyedJaggedTensor(keys=["movie_id"], values=torch.tensor([5, 1, 5, 3, 7]),
                                              lengths=torch.tensor([1, 1, 1, 1, 1]), stride=5),
                            {"movie_id": dom}, train=True)
    main_rows = torch.randn(5, 6, requires_grad=True)
    shadow_rows = torch.randn(5, 6, requires_grad=True)
    kt = KeyedTensor(keys=["movie_id", "movie_id__shadow"], length_per_key=[6, 6],
                     values=torch.cat([main_rows, shadow_rows], 1))
    term = TransferTerm()
    rt = _RT(dom, coef=0.5)
    term.set_runtime(rt)
    term.train()
    main = torch.tensor(1.0, requires_grad=True)
    loss = term(main, kt, kjt)
    src, tgt = rt.losses["movie_id"].calls[0]
    assert tgt.shape == (2, 2) and src.shape == (2, 2)      # ids {5, 7} and {1, 3}; factor dim 2
    assert not src.requires_grad
    loss.backward()
    # gradient reaches the shadow rows of the first example of each target id, factor columns only
    nz = (shadow_rows.grad.abs().sum(1) > 0).tolist()
    assert nz == [True, False, False, False, True]
    assert float(shadow_rows.grad[:, 2:].abs().sum()) == 0.0
    assert main_rows.grad is None or float(main_rows.grad.abs().sum()) == 0.0
    torch.testing.assert_close(loss, main + 0.5 * (tgt ** 2).sum())
    term.eval()
    assert term(main, kt, kjt) is main


def test_prepare_config_switches_lexico_per_transfer_table():
    cfg = Config()
    cfg.transfer.mode, cfg.transfer.features = "both", ["movie_id"]
    cfg.embedding.optimizer = EmbOptimConfig(name="cfsgd", lr=1.0)
    prepare_config(cfg)
    assert cfg.embedding.for_table("movie_id")[2].lexico is True
    assert cfg.embedding.for_table("user_id")[2].lexico is False
    assert table_feature_names(cfg, "movie_id") == ["movie_id", shadow_name("movie_id")]
    assert table_feature_names(cfg, "user_id") == ["user_id"]
    bad = Config()
    bad.transfer.mode, bad.transfer.features = "lexico", ["movie_id"]
    with pytest.raises(ConfigError, match="needs one of our kernels"):
        prepare_config(bad)                      # default optimizer is FBGEMM exact_sgd
    plus = Config()
    plus.transfer.mode, plus.transfer.features = "plus_t", ["movie_id"]
    plus.embedding.tables["movie_id"] = TableConfig(optimizer=EmbOptimConfig(name="cfsgd", lexico=True))
    prepare_config(plus)                         # +T never runs the lexico rule
    assert plus.embedding.for_table("movie_id")[2].lexico is False
    base = Config()
    assert table_feature_names(base, "movie_id") == ["movie_id"]


def test_transfer_defaults_are_the_measured_ones():
    """reports/quality: lexico_weight 0.3 (1 cost 0.14 AUC on the demo world), every target (target_frac 1)."""
    t = Config().transfer
    assert (t.lexico_weight, t.target_frac, t.loss, t.anchor_count_scale) == (0.3, 1.0, "neighbor", 5.0)


def test_target_frac_reaches_the_target_mask(tiny_ml):
    """transfer.target_frac=0.5: the rows pulled are only ids in the rarest half; the torso is left alone."""
    from data.stats import load_counts
    from trainer.transfer_wiring import build_domains

    counts = load_counts(tiny_ml)["movie_id"]
    n = len(counts)
    doms = {}
    for frac in (1.0, 0.5):
        cfg = Config()
        # lexico: all of T (both's T'_eta re-draws eta over the smaller T, so its kept set is no subset)
        cfg.data.path, cfg.transfer.mode, cfg.transfer.features = str(tiny_ml), "lexico", ["movie_id"]
        cfg.transfer.target_frac = frac
        doms[frac] = build_domains(cfg, {"movie_id": 16}, {"movie_id": n})["movie_id"]
    full, half = doms[1.0].in_target, doms[0.5].in_target
    assert half.sum() > 0 and (half & ~full).sum() == 0 and half.sum() < full.sum()
    seen = np.sort(counts[counts > 0])
    assert counts[half.numpy()].max() <= seen[int(np.floor(0.5 * len(seen))) - 1]   # the rarest half
    assert torch.equal(doms[0.5].is_source, doms[1.0].is_source)


def test_planted_groups_map_raw_ids_through_the_vocabulary(tiny_ml):
    planted = tiny_ml.parent / "raw" / "planted.json"
    g = planted_groups(tiny_ml, "movie_id", planted)
    from data.writer import load_vocab

    vocab = load_vocab(tiny_ml, "movie_id")
    p = json.loads(planted.read_text())
    twins, loners = {str(t) for t, _ in p["twins"]}, {str(m) for m in p["loners"]}
    for i, v in enumerate(vocab):
        assert g[i] == (0 if v in twins else 1 if v in loners else 2)
    assert (g == 0).sum() > 0 and (g == 1).sum() > 0


@pytest.mark.dist
def test_frage_select_run_reports_groups_and_resumes_discriminator(tiny_ml, tmp_path):
    planted = tiny_ml.parent / "raw" / "planted.json"
    args = ["--embedding.optimizer.name=cfsgd", "--embedding.optimizer.lr=1.0", "--transfer.mode=select",
            "--transfer.loss=frage", "--transfer.features=[movie_id]", "--transfer.weight=0.1",
            f"--transfer.eval_groups={planted}", "--train.epochs=1",
            "--train.log_every=1"]   # transfer statistics are sampled at log steps: here every step
    run = tmp_path / "run"
    run_trainer(run, tiny_ml, 1, *args, "--train.max_steps=3")
    first = results(run)["history"][-1]["transfer"]["movie_id"]
    assert first["domain"]["selective"] and first["domain"]["target_used"] == first["domain"]["kept"]
    assert first["frage_d_steps"] == pytest.approx(2.0)          # mean of 1, 2, 3
    assert 0.0 <= first["frage_d_acc"] <= 1.0
    run_trainer(run, tiny_ml, 1, *args, "--train.max_steps=5")  # resumes from step 3
    r = results(run)
    assert r["steps"] == 5
    # D restored (steps 4, 5 continue from 3); the statistics since the last evaluation travel with the
    # checkpoint, so the report is what an uninterrupted 5-step run gives: the mean of 1..5
    assert r["history"][-1]["transfer"]["movie_id"]["frage_d_steps"] == pytest.approx(3.0)
    for g in ("twin", "loner", "other", "tail"):
        assert g in r["best"]["test"]


def _flush_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from trainer.transfer_wiring import TransferRuntime

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    rt = TransferRuntime.__new__(TransferRuntime)        # only the metric accumulator is exercised
    rt.domains = {"movie_id": _domain()}
    # rank 1 owns movie_id's rows: only it has lambda statistics; both ranks computed the transfer loss
    def feed():
        rt._acc = {}
        for k, vals in ({"transfer_loss": [1.0, 3.0]} if rank == 0 else
                        {"transfer_loss": [5.0], "lambda_p50": [2.0, 4.0], "lambda_max": [9.0]}).items():
            for v in vals:
                rt._add("movie_id", k, v)

    feed()
    got = rt.flush_metrics()["movie_id"]
    feed()                            # a checkpoint in between: the sums move to rank 0 and nothing changes
    folded = rt.fold_for_checkpoint(rank)
    assert (rt._acc != {}) == (rank == 0)
    rt.load_fold(json.loads(json.dumps(folded)), rank)      # what a resumed run reads back from the metadata
    again = rt.flush_metrics()["movie_id"]
    (Path(out) / f"{rank}.json").write_text(json.dumps([got, again]))
    dist.destroy_process_group()


@pytest.mark.dist
def test_lambda_statistics_of_the_owner_rank_reach_every_rank(tmp_path):
    """Under table_wise sharding only the owner rank has a table's lambda statistics; flush_metrics (run
    at every evaluation) merges them, so rank 0 writes them to results.json and its log."""
    import torch.multiprocessing as mp

    from trainer.launch import free_port

    mp.spawn(_flush_worker, args=(2, f"tcp://127.0.0.1:{free_port()}", str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got, again = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["lambda_p50"] == pytest.approx(3.0) and got["lambda_max"] == pytest.approx(9.0)
        assert got["transfer_loss"] == pytest.approx((1.0 + 3.0 + 5.0) / 3)   # mean over every rank's steps
        assert again == got


def test_neighbor_anchor_is_the_row_of_the_neighbor_id_when_it_is_in_the_batch():
    from trainer.train_module import _anchor_pairs

    # batch ids of movie_id (unique, sorted) and the example holding each first; targets 5, 7, 9
    s_ids, s_first = torch.tensor([1, 3, 5, 7, 9]), torch.tensor([0, 1, 2, 3, 4])
    t_first = torch.tensor([2, 3, 4])
    nb = torch.tensor([3, 8, -1])            # 5 -> 3 (in the batch), 7 -> 8 (not in it), 9 -> none
    rows = torch.arange(5, dtype=torch.float).unsqueeze(1).repeat(1, 4)
    pooled = {"movie_id": rows, "movie_id__shadow": rows * 10}
    src, tgt, ok = _anchor_pairs(nb, s_ids, s_first, t_first, pooled, "movie_id", 3)
    assert src.tolist() == [[1.0] * 3] and tgt.tolist() == [[20.0] * 3] and ok.tolist() == [True, False, False]
    src, tgt, _ = _anchor_pairs(nb, s_ids[:0], s_first[:0], t_first, pooled, "movie_id", 3)
    assert src.shape == (0, 3) and tgt.shape == (0, 3)


def test_lexico_weight_scales_the_transfer_loss_and_zero_is_the_matched_step_control():
    from trainer.transfer_wiring import TransferRuntime

    for mode, weight, lexico_weight, want in (("lexico", 0.01, 1.0, 1.0), ("both", 0.01, 0.0, 0.0),
                                              ("select", 0.05, 0.0, 0.05)):
        cfg = Config()
        cfg.transfer.mode, cfg.transfer.features = mode, ["movie_id"]
        cfg.transfer.weight, cfg.transfer.lexico_weight = weight, lexico_weight
        assert TransferRuntime(cfg, {"movie_id": _domain()}, torch.device("cpu")).coef == want


def test_csv_eval_groups_map_raw_ids_and_refuse_bad_lines(tiny_ml, tmp_path):
    from data.writer import load_vocab
    from trainer.transfer_wiring import MAX_EVAL_GROUPS, csv_groups

    vocab = load_vocab(tiny_ml, "movie_id")
    f = tmp_path / "groups.csv"
    f.write_text(f"id,group\n{vocab[3]},drama\n{vocab[5]},kids\n{vocab[7]},drama\nnot-an-id,kids\n\n")
    arr, names = csv_groups(tiny_ml, "movie_id", f)
    assert names == ("drama", "kids")
    assert arr[3] == 0 and arr[5] == 1 and arr[7] == 0 and (arr == -1).sum() == len(vocab) - 3
    for text, match in ((f"{vocab[1]},a,b\n", r"groups.csv:1: expected '<feature id>,<group>', got 3"),
                        (f"{vocab[1]},a\n{vocab[2]},b\n{vocab[1]},c\n", r"groups.csv:3: id .* in group 'a' at line 1"),
                        (f"{vocab[1]},tail\n", r"groups.csv:1: group name 'tail' is empty or reserved"),
                        ("".join(f"{vocab[i]},g{i}\n" for i in range(MAX_EVAL_GROUPS + 1)),
                         rf"groups.csv:{MAX_EVAL_GROUPS + 1}: more than {MAX_EVAL_GROUPS} groups")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=match):
            csv_groups(tiny_ml, "movie_id", f)


@pytest.mark.dist
def test_a_run_reports_the_users_csv_segments(tiny_ml, tmp_path):
    from data.writer import load_vocab

    vocab = load_vocab(tiny_ml, "movie_id")
    seg = tmp_path / "segments.csv"
    seg.write_text("".join(f"{v},{'even' if i % 2 == 0 else 'odd'}\n" for i, v in enumerate(vocab)))
    run = tmp_path / "run"
    run_trainer(run, tiny_ml, 1, f"--transfer.eval_groups={seg}", "--train.epochs=1", "--train.max_steps=3",
                "--metrics.enabled=true", f"--metrics.base_port={__import__('trainer.launch').launch.free_port()}")
    test = results(run)["best"]["test"]
    assert test["even"]["examples"] + test["odd"]["examples"] == test["all"]["examples"] > 0
    assert 0.0 <= test["even"]["auc"] <= 1.0
