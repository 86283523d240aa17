"""A real Prometheus server (Debian's `prometheus` package; `.ci/run` installs it) scrapes a real 2-rank
run with lexico and metrics on, through deploy/prometheus/prometheus.yml (ports and interval rewritten
for the test). Every expression of the Grafana dashboard is queried over Prometheus' HTTP API and must
return data carrying the labels its panel groups by; `promtool check metrics` must pass on a scrape."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import http_get, start_job
from trainer import launch

pytestmark = [pytest.mark.slow, pytest.mark.ops]
ROOT = launch.REPO
DASHBOARD = json.loads((ROOT / "deploy/grafana/dashboard.json").read_text())
# Grafana's variables, as a user picking "all ranks" / the valid split would have them
VARIABLES = {"$rank": ".*", "$__rate_interval": "10s", "$split": "valid"}
# Panels that need hardware this CPU run does not have (the gauge is only set on CUDA devices).
NEEDS_CUDA = {"tailrec_cuda_max_memory_allocated_bytes"}


def dashboard_exprs() -> list[str]:
    return sorted({t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", []) if t.get("expr")})


def _expand(expr: str) -> str:
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def _grouped_by(expr: str) -> set[str]:
    """Labels an aggregation keeps (``by (a, b)``), outermost first; the result must carry them."""
    m = re.match(r"\s*\w+\s+by\s*\(([^)]*)\)", expr)
    return {x.strip() for x in m.group(1).split(",")} if m else set()


def _query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read().decode())
    assert body["status"] == "success", body
    res = body["data"]["result"]
    return res if isinstance(res, list) else [{"metric": {}, "value": res}]


@pytest.fixture
def prometheus_bin():
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prom and tool):
        pytest.skip("prometheus/promtool not installed (apt-get install prometheus; .ci/run does it)")
    return prom, tool


def _config(tmp: Path, base_port: int) -> Path:
    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "tailrec")
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{base_port + r}" for r in range(2)]
    cfg["scrape_configs"] = [job]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_every_dashboard_query_returns_data_from_a_real_prometheus(prometheus_bin, tiny_ml, tmp_path):
    prom, promtool = prometheus_bin
    r = subprocess.run([promtool, "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    job = start_job(tmp_path / "run", tiny_ml, "--train.epochs=4", "--embedding.optimizer.name=cfsgd",
                    "--embedding.optimizer.lr=1", "--transfer.mode=lexico", "--transfer.features=[movie_id]",
                    metrics=True)
    web = launch.free_port()
    server = subprocess.Popen([prom, f"--config.file={_config(tmp_path, job.metrics_port)}",
                               f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web}"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    base = f"http://127.0.0.1:{web}"
    exprs = {e: _expand(e) for e in dashboard_exprs()}
    found: dict[str, list[dict]] = {}
    scrape_text = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and job.proc.poll() is None and len(found) < len(exprs) - len(NEEDS_CUDA):
            time.sleep(1)
            if http_get(f"{base}/-/ready") is None:
                continue
            text = http_get(job.urls[0])
            if text and "tailrec_lexico_lambda{" in text and "tailrec_eval_auc{" in text:
                scrape_text = text
            for raw, expr in exprs.items():
                if raw not in found:
                    res = _query(base, expr)
                    if res:
                        found[raw] = res
    finally:
        job.kill_tree()
        server.terminate()
        server.wait(timeout=30)
    missing = [e for e in exprs if e not in found and not any(n in e for n in NEEDS_CUDA)]
    assert not missing, f"no data for: {missing}\n{job.log()[-3000:]}"
    for raw, res in found.items():
        want = _grouped_by(raw)
        assert all(want <= set(s["metric"]) for s in res), (raw, res[:2])
    # the lexico panels really show lexico: per table and percentile
    lam = found["max by (table, percentile) (tailrec_lexico_lambda)"]
    assert {s["metric"]["table"] for s in lam} == {"movie_id"}
    assert {s["metric"]["percentile"] for s in lam} >= {"p50", "p90", "p99"}
    # promtool's naming lint on a real scrape (rank 0, after an evaluation, lexico series present)
    assert scrape_text, "no scrape with lexico and eval series"
    lint = subprocess.run([promtool, "check", "metrics"], input=scrape_text, capture_output=True, text=True)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint.stdout + lint.stderr
    assert "_created" not in scrape_text
