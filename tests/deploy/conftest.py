"""Helpers for deploy tests: run the real `torchx` CLI from the venv, from the repository root."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPONENT = "deploy/components.py:train"


def _torchx_bin() -> str:
    # The venv's torchx, next to the running interpreter (tests need not run from an activated venv).
    here = Path(sys.executable).parent / "torchx"
    return str(here) if here.exists() else (shutil.which("torchx") or "torchx")


def run_torchx(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # torchrun/python of this venv first on PATH, for local_cwd jobs.
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    return subprocess.run([_torchx_bin(), *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def dryrun(scheduler: str, *component_args: str, cfg: str | None = None) -> subprocess.CompletedProcess:
    args = ["run", "--dryrun", "--workspace", "", "-s", scheduler]
    if cfg:
        args += ["-cfg", cfg]
    return run_torchx(*args, COMPONENT, *component_args)


def run_local_cwd(profile: str, *overrides: str, log_dir: Path, timeout: float = 300,
                  component_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Launch a real job with the local_cwd scheduler and wait for it (the CLI waits for local jobs).

    For the end-to-end 2-rank training test: ``run_local_cwd("demo-cpu", "--train.max_steps=20",
    "--data.path=...", log_dir=tmp_path)``; rank logs land under ``log_dir``.
    """
    return run_torchx("run", "-s", "local_cwd", "-cfg", f"log_dir={log_dir}", COMPONENT,
                      "--profile", profile, *component_args, "--", *overrides, timeout=timeout)


# Fixtures rather than imports: with --import-mode=importlib, test files cannot import conftest.
@pytest.fixture
def torchx_cli():
    return run_torchx


@pytest.fixture
def torchx_dryrun():
    return dryrun


@pytest.fixture
def local_cwd_job():
    return run_local_cwd


# ---------------------------------------------------------------- real multi-rank training runs
# Used by test_fault_tolerance.py and test_live_scrape.py (and to produce reports/ops/ artefacts:
# set TAILREC_OPS_REPORT=DIR and the tests copy their logs / scrapes there).
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from types import SimpleNamespace  # noqa: E402

CONFIG = "configs/movielens_deepfm.yaml"
# 2 ranks x 128 = 256 examples per step, 39 steps per epoch on the tiny dataset: a 2-epoch run has
# checkpoints at 10, 20, 30, 39 (epoch end), 40, 50, 60, 70, 78 and takes a few seconds of training.
RUN_ARGS = ("--train.epochs=2", "--data.batch_size=128", "--data.eval_batch_size=1024",
            "--embedding.tables.user_id.optimizer.name=cfsgd",   # our fused kernel: its state must resume too
            "--checkpoint.every_steps=10", "--train.log_every=5", "--train.device=cpu")


def free_port_block(n: int, tries: int = 50) -> int:
    """A base port with base..base+n-1 all free on 127.0.0.1 (metrics of rank r on base + r)."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                sk = socket.socket()
                socks.append(sk)
                sk.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError("no block of free ports")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` from /proc (no psutil)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(p.name))
    return out


def proc_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def workers_by_rank(launcher_pid: int) -> dict[int, int]:
    """{global rank: pid} of the torchrun workers below ``launcher_pid`` now (processes carrying RANK
    and TORCHELASTIC_RUN_ID: torchrun itself, or the torchx CLI above bash above torchrun)."""
    out = {}
    for pid in descendants(launcher_pid):
        env = proc_env(pid)
        if "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
            out[int(env["RANK"])] = pid
    return out


def wait_for(pred, timeout: float, what: str, interval: float = 0.02, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def latest_complete(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())
    return done[-1] if done else None


def http_get(url: str, timeout: float = 1.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


@dataclass
class Job:
    """A real ``torchrun --nproc_per_node N`` training job (gloo, CPU), started in the background."""
    run_dir: Path
    proc: subprocess.Popen
    log_path: Path
    metrics_port: int = 0
    nproc: int = 2
    scrapes: list = field(default_factory=list)   # (timestamp, rank, text) while polling
    _stop: threading.Event = field(default_factory=threading.Event)
    _poller: threading.Thread | None = None

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.metrics_port + r}/metrics" for r in range(self.nproc)]

    def start_polling(self, interval: float = 0.25) -> None:
        def poll():
            while not self._stop.is_set():
                for r, url in enumerate(self.urls):
                    text = http_get(url, timeout=0.5)
                    if text:
                        self.scrapes.append((time.time(), r, text))
                self._stop.wait(interval)

        self._poller = threading.Thread(target=poll, daemon=True)
        self._poller.start()

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._stop.set()
            if self._poller:
                self._poller.join(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_tree(self) -> None:
        """Clean-up after a failed test: the job runs in its own process group."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self._stop.set()

    def scrapes_jsonl(self, path: Path) -> Path:
        """Scrapes in deploy.render_dashboard's JSONL format (ranks scraped within one poll merged)."""
        frames: dict[float, list[str]] = {}
        last_ts = None
        for ts, rank, text in self.scrapes:
            if rank == 0 or last_ts is None:
                last_ts = ts
                frames[ts] = []
            frames[last_ts].append(text)
        with path.open("w") as f:
            for ts, texts in frames.items():
                f.write(json.dumps({"timestamp": ts, "text": "\n".join(texts)}) + "\n")
        return path


def start_job(run_dir: Path, dataset: Path, *overrides: str, nproc: int = 2, max_restarts: int = 0,
              metrics: bool = False) -> Job:
    port = free_port_block(nproc) if metrics else 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "trainer", "train", "--config", CONFIG,
           f"--data.path={dataset}", f"--run_dir={run_dir}", *RUN_ARGS]
    if metrics:
        cmd += ["--metrics.enabled=true", f"--metrics.base_port={port}"]
    cmd += list(overrides)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with log_path.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Job(run_dir, proc, log_path, port, nproc)


def report_dir() -> Path | None:
    d = os.environ.get("TAILREC_OPS_REPORT")
    if not d:
        return None
    p = Path(d) if Path(d).is_absolute() else ROOT / d
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture(scope="session")
def tiny_dataset(tiny_ml) -> Path:
    """The shared tiny generated MovieLens-format dataset (tests/conftest.py)."""
    return tiny_ml


@pytest.fixture(scope="session")
def reference_run(tiny_dataset, tmp_path_factory) -> Job:
    """One uninterrupted 2-rank run with metrics on free ports, scraped over HTTP while it runs.

    The live-scrape test reads its scrapes; the fault-tolerance test compares a killed-and-resumed
    run against its checkpoints and results (metrics do not touch training state).
    """
    job = start_job(tmp_path_factory.mktemp("ops_ref") / "run", tiny_dataset, metrics=True)
    job.start_polling()
    try:
        rc = job.wait(timeout=240)
    finally:
        job.kill_tree()
    assert rc == 0, job.log()[-6000:]
    return job


@pytest.fixture
def ops():
    """Helpers for real multi-rank runs (test files cannot import conftest under importlib mode)."""
    return SimpleNamespace(start_job=start_job, workers_by_rank=workers_by_rank, wait_for=wait_for,
                           latest_complete=latest_complete, http_get=http_get, report_dir=report_dir,
                           children=children, descendants=descendants, free_port_block=free_port_block, RUN_ARGS=RUN_ARGS)
