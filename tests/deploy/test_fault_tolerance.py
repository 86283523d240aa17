"""Fault tolerance for real: SIGKILL one of 2 ranks mid-epoch under ``torchrun --max-restarts``.

The job must restart, every rank must load the latest *complete* checkpoint (never a partly written
one), and the finished run must equal an uninterrupted one: same steps, bitwise-equal weights and
optimizer state, same evaluation numbers. The loader's deterministic position is checked directly:
the batches a resumed epoch yields are exactly the uninterrupted epoch's batches after the resumed
step (nothing skipped, nothing repeated).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

STEPS_PER_EPOCH = 39          # tiny dataset, 2 ranks x 128 (see conftest.RUN_ARGS)
KILL_AFTER_CKPT = 50          # epoch 1, step_in_epoch 11: mid-epoch, not on an epoch boundary
LOADED = re.compile(r"\[rank (\d)\] tailrec\.train: loaded (\S+): (\d+) epochs completed, step (\d+)")
EPOCH_DONE = re.compile(r"\[rank (\d)\] tailrec\.train: epoch (\d+): (\d+) steps in")


def _flatten(prefix: str, d) -> dict:
    if isinstance(d, dict):
        return {k2: v2 for k, v in d.items() for k2, v2 in _flatten(f"{prefix}.{k}", v).items()}
    return {prefix: d} if torch.is_tensor(d) else {}


def _tensors(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (weights, BN buffers, fused + dense optimizer state)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{ckpt.parent.parent.name}_{abs(hash(str(ckpt)))}_{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return _flatten("", torch.load(out, weights_only=True))


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _strip_timing(history: list) -> list:
    return [{k: v for k, v in e.items() if k not in ("seconds",)} for e in history]


@pytest.mark.ops
@pytest.mark.slow
def test_sigkill_one_rank_mid_epoch_resumes_exactly(ops, reference_run, tiny_ml, tmp_path):
    t0 = time.monotonic()
    job = ops.start_job(tmp_path / "killed", tiny_ml, max_restarts=2, metrics=True)
    run_dir = job.run_dir
    job.start_polling(interval=0.5)
    try:
        # 1. wait for a complete mid-epoch checkpoint, then SIGKILL rank 1 while it trains on
        ops.wait_for(lambda: (run_dir / "checkpoints" / f"step_{KILL_AFTER_CKPT:09d}" / "COMPLETE").exists(),
                     180, f"checkpoint step {KILL_AFTER_CKPT}", proc=job.proc)
        first = ops.workers_by_rank(job.proc.pid)
        assert set(first) == {0, 1}, first
        os.kill(first[1], signal.SIGKILL)
        # torchrun stops the surviving rank; wait until the whole first worker group is gone
        ops.wait_for(lambda: not set(ops.workers_by_rank(job.proc.pid).values()) & set(first.values()),
                     60, "the first worker group to exit", proc=job.proc)
        expected = ops.latest_complete(run_dir)   # nothing completes without rank 1 any more
        exp_step = int(expected.name.split("_")[1])
        assert exp_step >= KILL_AFTER_CKPT and exp_step % STEPS_PER_EPOCH != 0, expected

        # 2. a crash mid-save leaves a `.partial` (all shards written, never renamed) or a renamed
        #    but unmarked directory; both are newer than the real latest and must never be loaded
        partial = run_dir / "checkpoints" / "step_000000077.partial"
        unmarked = run_dir / "checkpoints" / "step_000000076"
        for fake in (partial, unmarked):
            shutil.copytree(expected, fake)
            (fake / "COMPLETE").unlink()

        rc = job.wait(timeout=240)
    finally:
        job.kill_tree()
    log = job.log()
    summary = ["# tests/deploy/test_fault_tolerance.py::test_sigkill_one_rank_mid_epoch_resumes_exactly",
               f"# waited for {KILL_AFTER_CKPT:09d}/COMPLETE, then SIGKILL rank 1 (pid {first[1]});"
               f" latest complete checkpoint then: {expected.name}",
               f"# planted before the restart: {partial.name} and {unmarked.name} (copies of {expected.name}"
               f" without COMPLETE) -- must not be loaded",
               f"# torchrun exit code: {rc}; test wall time so far {time.monotonic() - t0:.1f}s"]
    try:
        _check_killed_run(job, log, rc, first, expected, partial, reference_run, tmp_path, summary)
        summary.append("# RESULT: all checks passed (bit-identical to the uninterrupted run)")
    except AssertionError as e:
        summary.append(f"# RESULT: FAILED: {str(e)[:500]}")
        raise
    finally:
        _save_report(job, log, tmp_path, summary)


def _check_killed_run(job, log, rc, first, expected, partial, reference_run, tmp_path, summary) -> None:
    exp_step = int(expected.name.split("_")[1])
    assert rc == 0, log[-8000:]
    assert "exitcode: -9" in log and f"pid: {first[1]}" in log, "torchrun saw rank 1 die of SIGKILL"

    # 3. the restarted group: both ranks loaded the latest complete checkpoint, nothing else
    loads = LOADED.findall(log)
    assert sorted(int(r) for r, *_ in loads) == [0, 1], loads
    for _, path, epoch, step in loads:
        assert Path(path) == expected and int(step) == exp_step and int(epoch) == exp_step // STEPS_PER_EPOCH
    assert not partial.exists(), "the next complete save prunes stale .partial directories"
    resumed_in_epoch = exp_step % STEPS_PER_EPOCH
    # the resumed epoch ran exactly the remaining batches on every rank
    restarted = log[log.index("exitcode: -9"):]
    done = {(int(r), int(e)): int(n) for r, e, n in EPOCH_DONE.findall(restarted)}
    # epochs are numbered from 1 in the logs: the resumed one is epoch 2
    assert done == {(0, 2): STEPS_PER_EPOCH - resumed_in_epoch, (1, 2): STEPS_PER_EPOCH - resumed_in_epoch}, done

    # 4. the metrics endpoints came back (port rebound) and report the restart
    restarts = {r for _, r, text in job.scrapes if re.search(r'^tailrec_restarts\{rank="\d"\} 1\.0$', text, re.M)}
    assert restarts == {0, 1}, "both restarted ranks served /metrics with tailrec_restarts 1"

    # 5. same result as the uninterrupted run: steps, history, and every tensor bit for bit
    run_dir = job.run_dir
    ref, got = _results(reference_run.run_dir), _results(run_dir)
    assert got["steps"] == ref["steps"] == 2 * STEPS_PER_EPOCH
    assert _strip_timing(got["history"]) == _strip_timing(ref["history"])
    assert got["best"] == ref["best"]
    final = f"step_{2 * STEPS_PER_EPOCH:09d}"
    a = _tensors(reference_run.run_dir / "checkpoints" / final, tmp_path)
    b = _tensors(run_dir / "checkpoints" / final, tmp_path)
    assert a.keys() == b.keys() and any("running_mean" in k for k in a) and any("momentum" in k for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ after resume: {differ}"
    summary += [f"# both ranks loaded {expected.name} (epoch {exp_step // STEPS_PER_EPOCH}, step_in_epoch "
                f"{resumed_in_epoch}); resumed epoch ran {STEPS_PER_EPOCH - resumed_in_epoch} steps per rank",
                f"# steps {got['steps']} == uninterrupted {ref['steps']}; eval history identical; "
                f"{len(a)} checkpoint tensors bit-identical; best test AUC {got['best']['test']['all']['auc']:.6f}",
                "# metrics endpoints back after the restart with tailrec_restarts 1 on both ranks"]


def test_resumed_loader_yields_exactly_the_rest_of_the_epoch(tiny_ml):
    """The position a checkpoint stores (epoch, step_in_epoch) resumes the data stream exactly."""
    from data.loader import ParquetLoader
    from data.manifest import load_manifest

    feats = [f.name for f in load_manifest(tiny_ml).sparse_features]
    epoch, resumed_at = KILL_AFTER_CKPT // STEPS_PER_EPOCH, KILL_AFTER_CKPT % STEPS_PER_EPOCH

    def rows(batches) -> list[bytes]:   # one fingerprint per example: dense + sparse ids + label
        out = []
        for b in batches:
            kjt = b.sparse_features
            per_key = [kjt[k] for k in kjt.keys()]
            for i in range(b.labels.numel()):
                ids = [j.values()[j.offsets()[i]:j.offsets()[i + 1]].numpy().tobytes() for j in per_key]
                out.append(b"|".join([b.dense_features[i].numpy().tobytes(), *ids, b.labels[i].numpy().tobytes()]))
        return out

    whole, tails = [], []   # all ranks' examples of the epoch / of its resumed part
    for rank in range(2):
        kw = dict(rank=rank, world_size=2, seed=42, shuffle=True, drop_last=True, features=feats)
        full = ParquetLoader(tiny_ml, "train", 128, **kw)
        full.set_epoch(epoch)
        batches = [rows([b]) for b in full]
        assert len(batches) == STEPS_PER_EPOCH
        resumed = ParquetLoader(tiny_ml, "train", 128, **kw)
        resumed.set_epoch(epoch)
        resumed.load_state_dict({"epoch": epoch, "batches_yielded": resumed_at})
        rest = [rows([b]) for b in resumed]
        assert rest == batches[resumed_at:], f"rank {rank}: resumed stream != rest of the epoch"
        whole += [r for b in batches for r in b]
        tails += [r for b in rest for r in b]
    assert len(whole) == 2 * STEPS_PER_EPOCH * 128
    assert len(tails) == 2 * (STEPS_PER_EPOCH - resumed_at) * 128


def test_partial_checkpoint_is_never_loaded(tmp_path):
    """Checkpointer.latest(): only COMPLETE directories, whatever else a crash left behind."""
    from trainer.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path, rank=0, keep=2)
    assert ck.latest() is None
    state = {"w": torch.arange(4.0)}
    ck.save(10, state, {"step": 10})
    good = ck.latest()
    assert good == tmp_path / "step_000000010" and (good / "COMPLETE").exists()
    # a crash while writing step 20 (shards written, not renamed) and one between rename and marker
    shutil.copytree(good, tmp_path / "step_000000020.partial")
    (tmp_path / "step_000000020.partial" / "COMPLETE").unlink()
    shutil.copytree(good, tmp_path / "step_000000030")
    (tmp_path / "step_000000030" / "COMPLETE").unlink()
    (tmp_path / "step_000000040.partial").mkdir()          # crashed before any shard was written
    assert ck.latest() == good
    loaded = {"w": torch.zeros(4)}
    assert ck.load(ck.latest(), loaded)["step"] == 10 and torch.equal(loaded["w"], state["w"])
    # the next complete save replaces the stale partials and becomes the latest
    ck.save(50, {"w": torch.ones(4)}, {"step": 50})
    assert ck.latest() == tmp_path / "step_000000050"
    assert not list(tmp_path.glob("*.partial"))


def _save_report(job, log: str, tmp_path: Path, summary: list[str]) -> None:
    from_env = os.environ.get("TAILREC_OPS_REPORT")
    if not from_env:
        return
    out = Path(from_env)
    out.mkdir(parents=True, exist_ok=True)
    noise = ("fbgemm_gpu", "train_pipelines", "Successfully loaded", "torchrec.distributed.planner", "Warning",
             "HeuristicalStorageReservation", "is_fx_tracing", "warnings.warn", "debug_logger")
    keep = [ln for ln in log.splitlines() if not any(s in ln for s in noise)
            and not (re.match(r"^\[rank\d\]:", ln) and "Error" not in ln)]   # tracebacks: keep the error
    text = "\n".join([*summary, "", "# torchrun + trainer output (library noise and traceback frames dropped)",
                      *keep]) + "\n"
    (out / "kill_resume_test.log").write_text(text.replace(str(tmp_path), "$TMP"))


@pytest.mark.ops
@pytest.mark.slow
def test_torchx_local_cwd_max_restarts_recovers_from_sigkill(ops, reference_run, tiny_ml, tmp_path):
    """The same through the TorchX component: `--max_restarts 2` reaches torchrun and is enough."""
    import subprocess
    import sys

    port = ops.free_port_block(2)
    run_dir = tmp_path / "torchx_run"
    torchx = Path(sys.executable).parent / "torchx"
    cmd = [str(torchx), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
           "deploy/components.py:train", "--profile", "demo-cpu", "--max_restarts", "2",
           "--env", "TAILREC_LOG_ALL_RANKS=1", "--metrics_port", str(port), "--", f"--data.path={tiny_ml}", f"--run_dir={run_dir}",
           *ops.RUN_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "torchx.out"
    with out.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ops.wait_for(lambda: (run_dir / "checkpoints" / f"step_{KILL_AFTER_CKPT:09d}" / "COMPLETE").exists(),
                     180, f"checkpoint step {KILL_AFTER_CKPT}", proc=proc)
        first = ops.workers_by_rank(proc.pid)
        assert set(first) == {0, 1}, first
        os.kill(first[1], signal.SIGKILL)
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    cli = out.read_text(errors="replace")
    logs = cli + "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").rglob("*") if p.is_file())
    assert rc == 0 and "SUCCEEDED" in cli, cli[-4000:] + logs[-4000:]
    loads = {(int(r), int(step)) for r, _, _, step in LOADED.findall(logs)}
    steps = {step for _, step in loads}
    assert {r for r, _ in loads} == {0, 1} and len(steps) == 1, loads   # both ranks, one checkpoint
    (step,) = steps
    assert step >= KILL_AFTER_CKPT and step % STEPS_PER_EPOCH != 0, "resumed mid-epoch"
    ref, got = _results(reference_run.run_dir), _results(run_dir)
    assert got["steps"] == ref["steps"]
    assert _strip_timing(got["history"]) == _strip_timing(ref["history"])
