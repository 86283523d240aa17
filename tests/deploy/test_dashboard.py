"""Grafana dashboard and Prometheus config vs. the exporter in trainer/metrics.py (no drift)."""
from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
import yaml

from deploy.render_dashboard import PromQLError, evaluate, load_samples, parse_scrape, render
from trainer.config import MetricsConfig
from trainer.launch import free_port
from trainer.metrics import LABEL_NAMES, METRIC_NAMES, SCRAPE_METRIC_NAMES, PrometheusMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "deploy/grafana/dashboard.json").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
EXPRS = [t["expr"] for p in PANELS for t in p["targets"]]
PROMQL_FUNCTIONS = {"rate", "increase", "sum", "max", "min", "avg", "count", "histogram_quantile", "time",
                    "label_values"}
KEYWORDS = {"by", "without", "and", "or", "unless", "on", "ignoring"}
FAMILY_SUFFIX = re.compile(r"_(bucket|sum|count|total)$")


def promql_names(expr: str) -> tuple[set[str], set[str], set[str]]:
    """(metric names, label names, function names) used by one PromQL expression, by regex."""
    lv = re.fullmatch(r"\s*label_values\((\w+),\s*(\w+)\)\s*", expr)  # Grafana variable query
    if lv:
        return {lv.group(1)}, {lv.group(2)}, {"label_values"}
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors
    labels = set()
    for body in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body))
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    for body in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in body.split(",") if x.strip()}
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\"[^\"]*\"", " ", expr)
    funcs = set(re.findall(r"([A-Za-z_:][\w:]*)\s*\(", expr))
    idents = set(re.findall(r"(?<![\w.$])([A-Za-z_:][\w:]*)", expr)) - funcs - KEYWORDS
    return idents, labels, funcs


def test_dashboard_is_grafana_json_with_prometheus_variable():
    assert DASHBOARD["schemaVersion"] >= 36 and DASHBOARD["uid"] and DASHBOARD["title"]
    (ds,) = [v for v in DASHBOARD["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus"
    for p in PANELS:
        assert p["datasource"]["uid"] == "${" + ds["name"] + "}", p["title"]
        assert p["targets"] and all(t["refId"] and t["expr"] for t in p["targets"]), p["title"]
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])


def test_panels_do_not_overlap():
    cells = {}
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


@pytest.mark.parametrize("expr", EXPRS + [v["definition"] for v in DASHBOARD["templating"]["list"]
                                          if v["type"] == "query"])
def test_queries_use_only_exported_metrics_and_labels(expr):
    metrics, labels, funcs = promql_names(expr)
    assert metrics, f"no metric in {expr!r}"
    assert metrics <= METRIC_NAMES, f"{sorted(metrics - METRIC_NAMES)} not exported by trainer/metrics.py"
    assert labels <= LABEL_NAMES | {"le"}, f"unknown labels {sorted(labels - LABEL_NAMES)} in {expr!r}"
    assert funcs <= PROMQL_FUNCTIONS, f"unexpected functions {sorted(funcs - PROMQL_FUNCTIONS)}"


def test_regex_extraction_itself():
    m, lbl, f = promql_names('histogram_quantile(0.99, sum by (le) (rate(tailrec_x_bucket{rank=~"$rank"}[5m])))')
    assert (m, lbl, f) == ({"tailrec_x_bucket"}, {"le", "rank"}, {"histogram_quantile", "sum", "rate"})


def test_every_exported_family_has_a_panel():
    used = {FAMILY_SUFFIX.sub("", n) for e in EXPRS for n in promql_names(e)[0]}
    families = {FAMILY_SUFFIX.sub("", n) for n in SCRAPE_METRIC_NAMES}
    assert families - used == set(), "exported but never shown on the dashboard"


def test_required_views_present():
    text = " ".join(EXPRS)
    for needle in ("sum(rate(tailrec_train_examples_total", "sum by (rank) (rate(tailrec_train_examples_total",
                   "histogram_quantile(0.5,", "histogram_quantile(0.99,", "tailrec_dataloader_wait_seconds_total",
                   "time() - max(tailrec_checkpoint_last_success_timestamp_seconds)", "tailrec_restarts",
                   "tailrec_eval_auc", "tailrec_eval_ne", "tailrec_eval_logloss", "tailrec_cfsgd_row_frequency",
                   "tailrec_lexico_lambda", "tailrec_lexico_barrier_active_ratio",
                   "tailrec_process_resident_memory_bytes", "tailrec_embedding_information_abundance"):
        assert needle in text, needle


def test_prometheus_scrape_config_matches_metrics_defaults():
    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "tailrec"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    base = MetricsConfig().base_port
    assert targets == [f"{MetricsConfig().host}:{base + i}" for i in range(8)]
    assert job.get("metrics_path", "/metrics") == "/metrics"


# ----------------------------------------------------------------- rendering from real scrapes
@pytest.fixture(scope="module")
def scrapes():
    """10 scrapes, 15 s apart (synthetic clock), of two real exporters driven like a trainer would."""
    ms = [PrometheusMetrics(MetricsConfig(enabled=True, base_port=free_port()), r, 0, 2) for r in range(2)]
    out, t = [], 1_000.0
    try:
        for k in range(10):
            for r, m in enumerate(ms):
                for _ in range(3):
                    m.on_step(100, 0.03 if r == 0 else 0.3, 0.01, 0.7 - 0.01 * k, lr={"movie_id": 0.05})
                m.on_optimizer_stats("movie_id", "cfsgd", {"p50": 1, "p90": 4, "p99": 9, "max": 50 + k},
                                     {"active_ratio": 0.2, "p50": 0.1, "p90": 0.8, "max": 4.0})
                m.update_memory()
                m.on_restart(0)
                if k == 4:
                    m.on_checkpoint(2.0, t)
                if k % 3 == 2:
                    for bucket in ("all", "head", "torso", "tail"):
                        m.on_eval("valid", bucket, 0.7 + 0.01 * k, 0.5, 0.9)
                        m.on_collapse("movie_id", bucket, 5.0 + 0.1 * k)
            out.append((t, "\n".join(urllib.request.urlopen(m.url, timeout=5).read().decode() for m in ms)))
            t += 15.0
    finally:
        for m in ms:
            m.close()
    return out


@pytest.mark.slow  # matplotlib import + 17 subplots: a few seconds on a shared 2-core box
def test_render_draws_every_panel(scrapes, tmp_path):
    png = tmp_path / "dash.png"
    drawn = render(scrapes, png)
    assert set(drawn) == {p["title"] for p in PANELS}
    empty = [title for title, n in drawn.items() if n == 0]
    assert not empty, f"panels with no data from the exporter's own output: {empty}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_render_accepts_jsonl_files(scrapes, tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text("".join(json.dumps({"timestamp": t, "text": x}) + "\n" for t, x in scrapes[:3]))
    samples = load_samples([str(f), scrapes[3]])  # files and (timestamp, text) pairs mix
    assert [t for t, _ in samples] == [t for t, _ in scrapes[:4]]
    frames = [(t, parse_scrape(x)) for t, x in samples]
    assert len(evaluate("tailrec_train_loss", frames)) == 2  # one series per rank


def test_evaluator_values_match_what_was_recorded(scrapes):
    frames = [(t, parse_scrape(x)) for t, x in scrapes]
    (thr,) = evaluate('sum(rate(tailrec_train_examples_total[$__rate_interval]))', frames).values()
    assert thr[-1][1] == pytest.approx(2 * 300 / 15.0)  # 2 ranks x 3 steps x 100 examples per 15 s
    p50 = evaluate('histogram_quantile(0.5, sum by (le) (rate(tailrec_train_step_duration_seconds_bucket'
                   '{rank=~"0"}[1m])))', frames)
    assert 0.025 < list(p50.values())[0][-1][1] <= 0.05  # every step took 0.03 s: inside (0.025, 0.05]
    age = evaluate('time() - max(tailrec_checkpoint_last_success_timestamp_seconds)', frames)
    assert list(age.values())[0][-1][1] == pytest.approx(5 * 15.0)
    wait = evaluate(next(e for e in EXPRS if "dataloader_wait" in e), frames)
    by_rank = {dict(k)["rank"]: v[-1][1] for k, v in wait.items()}
    assert by_rank["0"] == pytest.approx(0.01 / 0.03) and by_rank["1"] == pytest.approx(0.01 / 0.3)
    with pytest.raises(PromQLError):
        evaluate("topk(3, tailrec_train_loss)", frames)
