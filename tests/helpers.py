"""Helpers shared by the test folders: run the real trainer (1 rank, or torchrun on gloo) and watch its
processes. Importable as ``tests.helpers`` (pytest's ``pythonpath = ["."]``); commands come from the
product's one launcher, ``trainer.launch``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from trainer import launch

REPO = launch.REPO
CONFIG = REPO / "configs" / "movielens_deepfm.yaml"


def run_trainer(run_dir: Path, dataset: Path, nproc: int, *overrides: str, command: str = "train",
                timeout: int = 240) -> subprocess.CompletedProcess:
    """A real trainer process (1 rank) or a real torchrun job (gloo) with the given overrides."""
    args = []
    if command == "train":
        args = [f"--data.path={dataset}", f"--run_dir={run_dir}", "--data.batch_size=256",
                "--data.eval_batch_size=1024", "--train.log_every=1000"]
    cmd = launch.trainer_command(command, CONFIG if command == "train" else None, [*args, *overrides], nproc=nproc,
                                 master_port=launch.free_port() if nproc > 1 else None)
    proc = subprocess.run(cmd, cwd=REPO, env=launch.subprocess_env(threads=1), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


# ---------------------------------------------------------------- real multi-rank jobs, watched from outside
# Used by tests/deploy (fault tolerance, live scrape) and to produce reports/ops/ artefacts: set
# TAILREC_OPS_REPORT=DIR and the tests copy their logs / scrapes there.
# 2 ranks x 128 = 256 examples per step, 39 steps per epoch on the tiny dataset: a 2-epoch run has
# checkpoints at 10, 20, 30, 39 (epoch end), 40, 50, 60, 70, 78 and takes a few seconds of training.
RUN_ARGS = ("--train.epochs=2", "--data.batch_size=128", "--data.eval_batch_size=1024",
            "--embedding.tables.user_id.optimizer.name=cfsgd",   # our fused kernel: its state must resume too
            "--checkpoint.every_steps=10", "--train.log_every=5", "--train.device=cpu")


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
    port = launch.free_port_block(nproc) if metrics else 0
    args = [f"--data.path={dataset}", f"--run_dir={run_dir}", *RUN_ARGS]
    if metrics:
        args += ["--metrics.enabled=true", f"--metrics.base_port={port}"]
    # torchrun even for max_restarts=0: the kill tests need its worker group and TORCHELASTIC_* env
    cmd = launch.trainer_command("train", "configs/movielens_deepfm.yaml", [*args, *overrides], nproc=nproc,
                                 max_restarts=max_restarts)
    if nproc == 1 and max_restarts == 0:
        raise ValueError("start_job runs torchrun jobs: nproc > 1 or max_restarts > 0")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    env = launch.subprocess_env(threads=1, TAILREC_LOG_ALL_RANKS="1")   # the tests read every rank's log
    with log_path.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Job(run_dir, proc, log_path, port, nproc)


def report_dir() -> Path | None:
    d = os.environ.get("TAILREC_OPS_REPORT")
    if not d:
        return None
    p = Path(d) if Path(d).is_absolute() else REPO / d
    p.mkdir(parents=True, exist_ok=True)
    return p
