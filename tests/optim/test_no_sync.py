"""No host sync in a training step: our code never reads a tensor's value on the host inside a step.

A host read (`.item()`, `.tolist()`, `int()`, `float()`, `bool()`, `__index__` of a tensor) drains the
device queue on a GPU. On a CPU box that cannot be observed, so these tests count the reads made by
our code instead (Tensor methods wrapped, calls attributed to the calling file): the step path of
the C++ op and of the Triton kernel (interpreter) must make none, the pure-torch fallback (which has
data-dependent shapes by design) must be caught, which shows the counter works. The training loop
is checked the same way over real steps. On a GPU, the gpu-marked test runs the kernel step under
torch.cuda.set_sync_debug_mode("error").
"""
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.optim.test_kernel import CONFIGS, loss_of, make_batch, split_out
from tests.optim.test_triton import build
from trainer.optim.kernel import MainLoss, load_extension

ROOT = Path(__file__).resolve().parents[2]
HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
# the step path: the optimizer package, the loop and the step drivers
STEP_FILES = (str(ROOT / "trainer" / "optim") + os.sep, str(ROOT / "trainer" / "loop.py"),
              str(ROOT / "trainer" / "pipeline.py"))


class HostReads:
    """Records host reads of tensor values whose caller is a file under `prefixes` while active."""

    def __init__(self, monkeypatch, prefixes=STEP_FILES):
        self.prefixes, self.calls, self.active = prefixes, [], False
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, orig):
        def read(t, *a, **k):
            if self.active:
                fr = sys._getframe(1)
                if fr.f_code.co_filename.startswith(self.prefixes):
                    self.calls.append(f"{name}() at {fr.f_code.co_filename}:{fr.f_lineno}")
            return orig(t, *a, **k)
        return read

    def __enter__(self):
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False


def _kernel_steps(tbe, reads, steps=2):
    for s in range(1, steps + 1):
        idx, off, psw = make_batch(s, weighted=True)
        with reads:
            out = tbe(idx, off, psw)
            main, tr = loss_of(split_out(out))
            tbe.main_loss = MainLoss(main.detach().reshape(1).clone())   # as set_main_loss hands it over
            (main + tr).backward()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("name", ["cfsgd_paper_decay_lexico", "adagrad_lexico_clip", "cfsgd_decay_warmup"])
def test_kernel_step_reads_nothing_on_the_host(backend, name, monkeypatch):
    if backend == "cpp" and load_extension() is None:
        pytest.skip("C++ extension unavailable here")
    monkeypatch.setenv("TAILREC_KERNEL", backend)
    tbe = build(CONFIGS[name], "sum", torch.device("cpu"))
    reads = HostReads(monkeypatch)
    _kernel_steps(tbe, reads)
    assert reads.calls == []
    assert int(tbe.step) == 2


def test_the_counter_catches_a_host_read(monkeypatch):
    """Negative control: the pure-torch fallback reads the step and loss on the host (rules.py takes
    Python numbers there), and the counter sees it."""
    monkeypatch.setenv("TAILREC_KERNEL", "torch")
    tbe = build(CONFIGS["cfsgd_paper_decay_lexico"], "sum", torch.device("cpu"))
    reads = HostReads(monkeypatch)
    _kernel_steps(tbe, reads)
    assert any("rules.py" in c for c in reads.calls), reads.calls


@pytest.mark.parametrize("transfer", [pytest.param(False, id="cfsgd"), pytest.param(True, id="cfsgd+transfer+lexico")])
def test_training_steps_read_the_loss_only_at_log_steps(transfer, tiny_ml, tmp_path, monkeypatch):
    """Real steps of the trainer (1 rank, gloo, the pipelined driver) with our kernel (and lexico +
    the transfer term): no host read in the step path between log steps (metrics on: the loss gauge
    is fed from the last log step)."""
    import torch.distributed as dist

    from trainer.config import load_config
    from trainer.dist import init_distributed
    from trainer.loop import Trainer
    from trainer.metrics import NullMetrics

    monkeypatch.delenv("TAILREC_KERNEL", raising=False)
    if load_extension() is None:
        pytest.skip("C++ extension unavailable here")
    cfg = load_config(str(ROOT / "configs" / "movielens_deepfm.yaml"), [
        f"--data.path={tiny_ml}", f"--run_dir={tmp_path}", "--data.batch_size=256", "--train.device=cpu",
        "--embedding.optimizer.name=cfsgd", "--train.log_every=4", "--train.max_steps=9",
        "--checkpoint.every_steps=0"] + (["--transfer.mode=lexico", "--transfer.features=[movie_id]"] if transfer else
                                          ["--transfer.mode=baseline"]))
    env = init_distributed("cpu")
    try:
        trainer = Trainer(cfg, env, NullMetrics())
        reads = HostReads(monkeypatch)
        steps_done, by_step = [], {}
        orig = trainer._run_steps

        def counted(driver, it, total):   # attribute reads to the step during which they happen
            inner = driver.progress

            def progress(i):
                by_step[trainer.state.step + 1] = len(reads.calls)
                steps_done.append(trainer.state.step + 1)
                return inner(i)
            driver.progress = progress
            with reads:
                return orig(driver, it, total)
        monkeypatch.setattr(trainer, "_run_steps", counted)
        trainer._train_epoch()
        assert trainer.state.step == 9
        # reads per step: the difference of the running count between consecutive steps
        marks = [by_step[s] for s in steps_done] + [len(reads.calls)]
        per_step = {s: reads.calls[a:b] for s, a, b in zip(steps_done, marks, marks[1:])}
        # step 1 (first step of the call: loss gauge) and log steps 4 and 8 may read; no other step does
        quiet = {s: c for s, c in per_step.items() if s not in (1, 4, 8)}
        assert all(not c for c in quiet.values()), quiet
        assert any(per_step[s] for s in (4, 8)), "the log steps read the loss (control: the counter is live)"
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU lane: pytest -m gpu)")
@pytest.mark.parametrize("name", ["cfsgd", "cfsgd_paper_decay_lexico", "adagrad_lexico_clip"])
def test_cuda_kernel_step_has_no_sync(name, monkeypatch):
    monkeypatch.delenv("TAILREC_KERNEL", raising=False)
    dev = torch.device("cuda")
    tbe = build(CONFIGS[name], "sum", dev)
    batches = [tuple(x.to(dev) for x in make_batch(s, weighted=True)) for s in range(1, 4)]
    for b in batches[:1]:  # warm-up: Triton compiles, FBGEMM loads
        main, tr = loss_of(split_out(tbe(*b)))
        tbe.main_loss = MainLoss(main.detach().reshape(1).clone())
        (main + tr).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[1:]:
            main, tr = loss_of(split_out(tbe(*b)))
            tbe.main_loss = MainLoss(main.detach().reshape(1).clone())
            (main + tr).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(tbe.step) == 3
