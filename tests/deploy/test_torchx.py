"""The TorchX component through the real `torchx` CLI (dry runs), plus profile loading."""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from deploy.components import train
from deploy.profiles import ProfileError, get_profile, load_profiles

pytestmark = pytest.mark.ops

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ("demo-cpu", "ml1m-1x8gpu", "criteo-2x8gpu")


def parse_dryrun(stdout: str) -> tuple[dict, str]:
    """(AppDef as a dict, scheduler request text) from `torchx run --dryrun` output."""
    app_text, _, request = stdout.partition("=== SCHEDULER REQUEST ===")
    app_text = app_text.split("=== APPLICATION ===", 1)[1]
    app_text = re.sub(r"<(\w+)\.(\w+): '\w+'>", r"'\1.\2'", app_text)  # enums -> strings
    return ast.literal_eval(app_text.strip()), request


def torchrun_argv(role: dict) -> list[str]:
    assert role["entrypoint"] == "bash" and role["args"][0] == "-c"
    return shlex.split(role["args"][1])


def flatten(request: str) -> str:
    """Undo pformat's split string literals and YAML's line folding, collapse whitespace."""
    return re.sub(r"\s+", " ", re.sub(r"['\"]\s+['\"]", "", request))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("scheduler", ["local_cwd", "local_docker", "slurm"])
def test_demo_profile_dryrun(torchx_dryrun, scheduler):
    res = torchx_dryrun(scheduler, "--profile", "demo-cpu", "--", "--train.max_steps=5")
    assert res.returncode == 0, res.stderr
    app, request = parse_dryrun(res.stdout)
    (role,) = app["roles"]
    argv = torchrun_argv(role)
    assert argv[0] == "torchrun"
    assert flag(argv, "--nnodes") == "1" and flag(argv, "--nproc_per_node") == "2"
    assert role["env"]["PET_MAX_RESTARTS"] == "0" and "--max-restarts" not in argv
    tail = argv[argv.index("-m"):]
    assert tail[:5] == ["-m", "trainer", "train", "--config", "configs/movielens_deepfm.yaml"]
    # profile overrides, then metrics, then the command line's (last wins in the trainer)
    assert tail[5:] == ["--train.device=cpu", "--run_dir=runs/torchx-demo/train", "--metrics.enabled=true",
                        "--metrics.base_port=9400",
                        "--metrics.host=127.0.0.1", "--train.max_steps=5"]
    assert role["image"] == "tailrec:0.1"
    assert role["env"]["OMP_NUM_THREADS"] == "1" and role["env"]["TAILREC_PROFILE"] == "demo-cpu"
    assert role["port_map"] == {"c10d": 29500, "metrics-0": 9400, "metrics-1": 9401}
    assert role["max_retries"] == 0 and role["num_replicas"] == 1
    assert role["resource"]["cpu"] == 2 and role["resource"]["memMB"] == 4096
    assert "-m trainer train --config configs/movielens_deepfm.yaml" in flatten(request)


def test_criteo_profile_on_slurm_with_explicit_overrides(torchx_dryrun):
    res = torchx_dryrun("slurm", "--profile", "criteo-2x8gpu", "--env", "FOO=1,NCCL_DEBUG=INFO",
                        "--max_restarts", "5", "--max_retries", "1", "--image", "reg.example/tailrec:9")
    assert res.returncode == 0, res.stderr
    app, request = parse_dryrun(res.stdout)
    (role,) = app["roles"]
    argv = torchrun_argv(role)
    assert flag(argv, "--nnodes") == "2" and flag(argv, "--nproc_per_node") == "8"
    assert role["env"]["PET_MAX_RESTARTS"] == "5"          # torchrun's own env form of --max-restarts
    assert "--max-restarts" not in argv                   # ddp's command is not edited
    assert flag(argv, "--config") == "configs/criteo_dlrm.yaml"
    assert "--metrics.host=0.0.0.0" in argv  # scraped through the pod/node network
    assert role["num_replicas"] == 2 and role["max_retries"] == 1
    assert role["image"] == "reg.example/tailrec:9"
    env = role["env"]
    assert env["FOO"] == "1" and env["NCCL_DEBUG"] == "INFO"  # explicit wins ...
    assert env["FI_PROVIDER"] == "efa"  # ... and the rest of the profile's env is kept
    assert role["resource"]["gpu"] == 8  # h=aws_p4d.24xlarge
    assert {f"metrics-{i}" for i in range(8)} <= set(role["port_map"])
    assert role["port_map"]["metrics-7"] == 9407
    assert request.count("#SBATCH --job-name=trainer-") == 2  # one het-job group per node
    assert "--partition=gpu" in request and "--gpus-per-task=8" in request  # [slurm] in .torchxconfig
    assert "TORCHX_MAX_RETRIES=1" in request


def test_ml1m_profile_on_local_docker_has_mounts_and_gpus(torchx_dryrun):
    res = torchx_dryrun("local_docker", "--profile", "ml1m-1x8gpu", "-j", "1x4")
    assert res.returncode == 0, res.stderr
    app, request = parse_dryrun(res.stdout)
    (role,) = app["roles"]
    assert flag(torchrun_argv(role), "--nproc_per_node") == "4"
    assert set(role["port_map"]) == {"c10d", "metrics-0", "metrics-1", "metrics-2", "metrics-3"}
    assert {"/data", "/runs"} <= {m["dst_path"] for m in role["mounts"]}  # + EFA devices from h
    assert "image: ghcr.io/tailrec/tailrec:0.1.0" in request


def test_kubernetes_dryrun(torchx_dryrun):
    if importlib.util.find_spec("kubernetes") is None:
        pytest.skip("python package `kubernetes` not installed: torchx's kubernetes dryrun needs it")
    res = torchx_dryrun("kubernetes", "--profile", "criteo-2x8gpu")
    assert res.returncode == 0, res.stderr
    _, request = parse_dryrun(res.stdout)
    assert "containerPort: 9400" in request and "name: metrics-0" in request
    assert "queue: default" in request


def test_kubernetes_profile_keeps_checkpoints_on_a_pvc(torchx_dryrun):
    """A rescheduled pod must find its checkpoints: the k8s profile mounts PVCs, never hostPath."""
    if importlib.util.find_spec("kubernetes") is None:
        pytest.skip("python package `kubernetes` not installed: torchx's kubernetes dryrun needs it")
    res = torchx_dryrun("kubernetes", "--profile", "criteo-2x8gpu-k8s")
    assert res.returncode == 0, res.stderr
    _, request = parse_dryrun(res.stdout)
    text = flatten(request)
    assert "hostPath" not in request and "host_path" not in request
    assert "claimName: tailrec-runs" in text and "claimName: tailrec-data" in text
    assert "mountPath: /runs" in text and "--run_dir=/runs/criteo-dlrm" in text


def test_kubernetes_appdef_in_process():
    # Same AppDef the kubernetes scheduler turns into pods (port_map -> containerPorts).
    app = train(profile="criteo-2x8gpu", cpu=32, gpu=8, memMB=200_000)
    role = app.roles[0]
    assert role.resource.cpu == 32 and role.resource.memMB == 200_000  # explicit cpu/gpu/mem drops h
    assert all(len(name) <= 15 for name in role.port_map)  # k8s port-name limit
    assert role.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_unknown_profile_fails_clearly(torchx_dryrun):
    res = torchx_dryrun("local_cwd", "--profile", "nope")
    assert res.returncode != 0
    assert "unknown profile 'nope'" in res.stderr
    for name in PROFILES:
        assert name in res.stderr


def test_component_help_lists_arguments(torchx_cli):
    res = torchx_cli("run", "-s", "local_cwd", "deploy/components.py:train", "--help")
    assert res.returncode == 0, res.stderr
    for arg in ("--profile", "-j", "--image", "--env", "--config", "--metrics_port", "--max_restarts"):
        assert arg in res.stdout
    help_text = " ".join(res.stdout.split())
    for arg in ("--cpu int", "--gpu int", "--memMB int", "--metrics_port int", "--max_retries int",
                "--max_restarts int", "--image str", "--config str"):
        assert arg in help_text, arg                     # typed, not everything "str"
    assert "optional trainer config overrides" in help_text


def test_torchxconfig_default_component(torchx_cli):
    # [cli:run] component + scheduler from .torchxconfig: no component name, no -s needed.
    res = torchx_cli("run", "--dryrun", "--", "--profile", "demo-cpu")
    assert res.returncode == 0, res.stderr
    app, _ = parse_dryrun(res.stdout)
    assert app["roles"][0]["env"]["TORCHX_JOB_ID"].startswith("local_cwd://")


def test_builtins_lists_component(torchx_cli):
    try:
        eps = importlib.metadata.entry_points(group="torchx.components")
    except Exception:  # pragma: no cover
        eps = []
    if not any(ep.name == "tailrec" for ep in eps):
        pytest.skip("project not installed (`pip install -e .` registers the torchx.components entry point)")
    res = torchx_cli("builtins")
    assert res.returncode == 0, res.stderr
    assert "tailrec.train" in res.stdout


def test_all_profiles_load_and_build():
    profiles = load_profiles(ROOT / "torchx.yaml")
    assert set(PROFILES) <= set(profiles)
    for name in profiles:
        app = train(profile=name)
        assert app.roles[0].env["PET_MAX_RESTARTS"] == str(profiles[name].max_restarts)
        assert app.roles[0].args[1].startswith("torchrun ")
        assert (ROOT / profiles[name].config).is_file(), f"{name}: {profiles[name].config} missing"


@pytest.mark.parametrize("text, message", [
    ("profiles:\n  x:\n    j: 1x2\n    gpus: 8\n", r"unknown key\(s\) \['gpus'\]"),
    ("profiles:\n  x:\n    j: two\n", "x.j"),
    ("profiles:\n  x:\n    cpu: lots\n", "x.cpu: expected int"),
    ("profiles:\n  x:\n    env: {NCCL_SOCKET_IFNAME: '^lo,docker'}\n", "must not contain ','"),
    ("x:\n  j: 1x2\n", "top level"),
])
def test_profile_validation_errors(tmp_path, text, message):
    bad = tmp_path / "profiles.yaml"
    bad.write_text(text)
    with pytest.raises(ProfileError, match=message):
        load_profiles(bad)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ProfileError, match="known profiles: demo-cpu"):
        get_profile("missing", ROOT / "torchx.yaml")


def test_metrics_port_zero_disables_metrics():
    app = train(profile="demo-cpu", metrics_port=0)
    role = app.roles[0]
    assert set(role.port_map) == {"c10d"}
    assert "--metrics.enabled=false" in role.args[1]


@pytest.mark.slow
def test_local_cwd_two_rank_training(local_cwd_job, tmp_path):
    """End-to-end: a real 2-rank gloo job through `torchx run -s local_cwd`, scraped while it runs."""
    import socket
    import subprocess
    import sys
    import threading
    import time

    from deploy.render_dashboard import parse_scrape, render, scrape

    py = [sys.executable, "-m", "trainer"]
    subprocess.run([*py, "generate", "--format", "movielens", "--out", str(tmp_path / "raw"), "--rows", "20000"],
                   cwd=ROOT, check=True, capture_output=True)
    subprocess.run([*py, "convert", "movielens", "--src", str(tmp_path / "raw"), "--out", str(tmp_path / "ds"),
                    "--no-progress"], cwd=ROOT, check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    urls = [f"http://127.0.0.1:{port + i}/metrics" for i in range(2)]
    samples, done = [], threading.Event()

    def poll():
        while not done.is_set():
            ts, text = scrape(urls, timeout=1)
            if text.strip():
                samples.append((ts, text))
            time.sleep(0.3)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        # bucket_feature='' : the demo config's head/tail buckets on movie_id currently fail under 2 ranks
        # ("must be single-valued"); drop the override once the trainer handles it.
        res = local_cwd_job("demo-cpu", f"--data.path={tmp_path / 'ds'}", f"--run_dir={tmp_path / 'run'}",
                            "--train.max_steps=150", "--train.epochs=3", "--data.batch_size=128",
                            "--data.bucket_feature=''", log_dir=tmp_path / "logs",
                            component_args=("--metrics_port", str(port)))
    finally:
        done.set()
        poller.join(timeout=5)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SUCCEEDED" in res.stderr + res.stdout
    seen = {}
    for _, text in samples:
        seen.update(parse_scrape(text))
    ranks = {dict(lbl)["rank"] for (name, lbl) in seen if name == "tailrec_train_examples_total"}
    assert ranks == {"0", "1"}, "both ranks served /metrics on base + local rank"
    assert any(name == "tailrec_eval_auc" for name, _ in seen) or len(samples) < 3
    drawn = render(samples, tmp_path / "dash.png")
    assert drawn["Throughput per rank"] == 2
