"""Helpers for deploy tests: run the real `torchx` CLI from the venv, from the repository root."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import (RUN_ARGS, Job, children, descendants, http_get, latest_complete, report_dir, start_job,
                           wait_for, workers_by_rank)
from trainer import launch

ROOT = launch.REPO
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


@pytest.fixture
def torchx_cli():
    return run_torchx


@pytest.fixture
def torchx_dryrun():
    return dryrun


@pytest.fixture
def local_cwd_job():
    return run_local_cwd


@pytest.fixture(scope="session")
def reference_run(tiny_ml, tmp_path_factory) -> Job:
    """One uninterrupted 2-rank run with metrics on free ports, scraped over HTTP while it runs.

    The live-scrape test reads its scrapes; the fault-tolerance test compares a killed-and-resumed
    run against its checkpoints and results (metrics do not touch training state).
    """
    job = start_job(tmp_path_factory.mktemp("ops_ref") / "run", tiny_ml, metrics=True)
    job.start_polling()
    try:
        rc = job.wait(timeout=240)
    finally:
        job.kill_tree()
    assert rc == 0, job.log()[-6000:]
    return job


@pytest.fixture
def ops():
    """Helpers for real multi-rank runs, as one fixture."""
    return SimpleNamespace(start_job=start_job, workers_by_rank=workers_by_rank, wait_for=wait_for,
                           latest_complete=latest_complete, http_get=http_get, report_dir=report_dir,
                           children=children, descendants=descendants, free_port_block=launch.free_port_block,
                           RUN_ARGS=RUN_ARGS)
