"""Real 2-rank torchrun/gloo runs of shard_model (worker: sharding_worker.py).

Reference: a single-process float64 replay of the same steps (all ranks' batches, TorchRec's
gradient division by world size). Tolerance: 1e-6 absolute on weights and state (float32
kernels; observed ~5e-8)."""
import json
import subprocess
from pathlib import Path

import pytest

from trainer import launch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("sharding_worker.py")
TOL = 1e-6


def torchrun(tmp_path, *scenarios, nproc=2):
    port = launch.free_port()
    out = tmp_path / f"res_{port}.json"
    cmd = launch.command([str(out), *scenarios], nproc=nproc, module=None, script=WORKER, master_port=port)
    proc = subprocess.run(cmd, cwd=ROOT, env=launch.subprocess_env(threads=1), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from trainer.optim import kernel

    kernel.load_extension()  # compile once here, not concurrently in both ranks
    return torchrun(tmp_path_factory.mktemp("shard"), "ours:table_wise", "ours:row_wise", "ours:column_wise",
                    "ours:table_row_wise", "lexico:table_wise", "lexico:row_wise", "lexico:table_row_wise",
                    "lexicoloss:table_wise", "lexicoloss:row_wise", "fbgemm", "vsfbgemm:-1,-1", "vsfbgemm:2,2")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "column_wise", "table_row_wise"])
def test_our_kernel_matches_reference(results, sharding):
    r = results[f"ours:{sharding}"]
    for w in (0, 1):  # unweighted and per-sample-weighted KJTs
        assert r[f"w_err_weighted{w}"] < TOL and r[f"state_err_weighted{w}"] < TOL
        assert r[f"moved_weighted{w}"] > 0.05  # the steps did something
    assert sharding in r["plan_text"] and "cfsgd" in r["plan_text"]
    if sharding == "column_wise":  # t2 really split: one 32-column shard per rank
        assert len({p for _, p in r["t2_shards"]}) == 2, r["t2_shards"]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "table_row_wise"])
def test_shadow_features_give_exact_lambda(results, sharding):
    r = results[f"lexico:{sharding}"]
    assert r["w_err"] < TOL
    assert r["lexico_vs_plain"] > 1e-3  # lambda (needing g and h apart) changed the result


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_barrier_uses_the_global_main_loss_when_the_loss_term_binds(results, sharding):
    """phi = alpha * min(||g||^2, loss) with loss < ||g||^2 on many rows: the kernel must use the mean loss
    over ranks. The same run with set_main_loss not all-reduced, or with the loss x1000, misses the
    float64 replay (so this test would catch either bug)."""
    r = results[f"lexicoloss:{sharding}"]
    assert r["loss_term_binds_rows"] > 10, r
    assert r["w_err"] < TOL
    assert r["w_err_no_allreduce"] > 100 * TOL and r["w_err_loss_x1000"] > 100 * TOL, r


@pytest.mark.dist
@pytest.mark.slow
def test_fbgemm_baselines_follow_documented_rules(results):
    r = results["fbgemm"]
    for name in ("exact_sgd", "exact_adagrad", "exact_rowwise_adagrad", "counter_sgd"):
        assert r[f"err_{name}"] < TOL, name
    assert r["untouched_changed"] == 0.0 and 0 < r["touched_rows"] < 20
    assert r["counter_sgd_counter_max"] >= 2


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("arg", ["-1,-1", "2,2"])  # (halflife, adjustment_iter)
def test_cfsgd_matches_fbgemm_counter_sgd_step_for_step(results, arg):
    r = results[f"vsfbgemm:{arg}"]
    assert max(r["w_err_per_step"]) < TOL and r["counter_err"] < TOL


@pytest.mark.dist
@pytest.mark.slow
def test_dcp_save_then_load_in_new_process(tmp_path):
    ckpt = tmp_path / "ckpt"
    a = torchrun(tmp_path, f"dcpsave:{ckpt}")[f"dcpsave:{ckpt}"]
    b = torchrun(tmp_path, f"dcpload:{ckpt}")[f"dcpload:{ckpt}"]
    assert a["at_ckpt"] == b["at_ckpt"]   # rows, counters, last_step, step restored exactly
    assert a["final"] == b["final"]       # and further steps identical (bit for bit)
    assert b["at_ckpt"]["step_k0"][0] == 3 and any(v > 0 for v in b["at_ckpt"]["momentum1_k0"])
    assert any(v > 0 for v in b["at_ckpt"]["momentum1_k1"])   # k1's uint8 counter levels (counter_bytes=1)
    # cfsgd's default ub_mode="table": the per-shard running means (row_wise: one per rank) are restored too
    ub = b["at_ckpt"]["ub_state"]
    assert sorted(ub) == ["k0@0,0", "k0@25,0", "k1@0,0", "k1@15,0"], ub
    assert all(v[1] == 3 and v[0] > 0 for v in ub.values())


def test_plan_rejects_fused_table_on_data_parallel():
    from torchrec import EmbeddingBagConfig

    from trainer.config import EmbeddingConfig, EmbOptimConfig
    from trainer.sharding import _constraints

    t = [EmbeddingBagConfig(num_embeddings=10, embedding_dim=8, name="t", feature_names=["f"])]
    with pytest.raises(ValueError, match="data_parallel"):
        _constraints(EmbeddingConfig(sharding_type="data_parallel"), t)
    c = _constraints(EmbeddingConfig(optimizer=EmbOptimConfig(name="dense_adam")), t)
    assert c["t"].sharding_types == ["data_parallel"] and c["t"].compute_kernels == ["dense"]
    with pytest.raises(ValueError, match="column_wise"):
        _constraints(EmbeddingConfig(sharding_type="column_wise",
                                     optimizer=EmbOptimConfig(name="cfsgd", lexico=True)), t)
