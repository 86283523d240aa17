"""PrometheusMetrics over real HTTP: values move after calls, bounded labels, 127.0.0.1 by default."""
from __future__ import annotations

import http.server
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainer.config import MetricsConfig
from trainer.launch import free_port
from trainer.metrics import (LABEL_NAMES, METRIC_NAMES, MetricsSink, NullMetrics, PrometheusMetrics,
                             SCRAPE_METRIC_NAMES, build_metrics)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples, name, **labels):
    return samples[(name, frozenset({k: str(v) for k, v in labels.items()}.items()))]


@pytest.fixture
def exporter():
    made = []

    def make(rank=0, local_rank=0, **cfg):
        m = PrometheusMetrics(MetricsConfig(enabled=True, base_port=free_port() - local_rank, **cfg),
                              rank=rank, local_rank=local_rank, world_size=2)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def test_defaults_bind_loopback_and_port_is_base_plus_local_rank(exporter):
    assert MetricsConfig().host == "127.0.0.1"
    m = exporter(rank=3, local_rank=1)
    assert m.port == m.cfg.base_port + 1
    assert m._server.server_address[0] == "127.0.0.1"
    assert m.url.startswith("http://127.0.0.1:")


def test_step_metrics_move_over_http(exporter):
    m = exporter(rank=1)
    m.on_step(examples=256, step_seconds=0.02, data_wait_seconds=0.005, loss=0.7, lr={"movie_id": 0.05})
    first = scrape(m.url)
    m.on_step(examples=256, step_seconds=0.04, data_wait_seconds=0.001, loss=0.5)
    s = scrape(m.url)
    assert value(first, "tailrec_train_examples_total", rank=1) == 256
    assert value(s, "tailrec_train_examples_total", rank=1) == 512
    assert value(s, "tailrec_train_steps_total", rank=1) == 2
    assert value(s, "tailrec_train_step_duration_seconds_count", rank=1) == 2
    assert value(s, "tailrec_train_step_duration_seconds_sum", rank=1) == pytest.approx(0.06)
    assert value(s, "tailrec_train_step_duration_seconds_bucket", rank=1, le="0.025") == 1
    assert value(s, "tailrec_dataloader_wait_seconds_total", rank=1) == pytest.approx(0.006)
    assert value(s, "tailrec_train_loss", rank=1) == 0.5
    assert value(s, "tailrec_embedding_learning_rate", rank=1, table="movie_id") == 0.05


def test_optimizer_eval_checkpoint_restart_memory(exporter):
    m = exporter(rank=0)
    m.on_optimizer_stats("movie_id", "cfsgd", {"p50": 1, "p90": 4, "p99": 30, "max": 900},
                         {"active_ratio": 0.25, "p50": 0.1, "p90": 1.2, "max": 10.0})
    m.on_optimizer_stats("user_id", "exact_sgd", None, None)  # baselines have neither
    m.on_eval("valid", "tail", auc=0.71, logloss=0.55, ne=0.93)
    m.on_checkpoint(duration_seconds=3.0, timestamp=1_700_000_000.0)
    m.on_restart(2)
    m.update_memory()
    s = scrape(m.url)
    lbl = dict(rank=0, table="movie_id", optimizer="cfsgd")
    assert value(s, "tailrec_cfsgd_row_frequency", percentile="p99", **lbl) == 30
    assert value(s, "tailrec_cfsgd_row_frequency", percentile="p100", **lbl) == 900
    assert value(s, "tailrec_lexico_lambda", percentile="p90", **lbl) == 1.2
    assert value(s, "tailrec_lexico_barrier_active_ratio", **lbl) == 0.25
    assert value(s, "tailrec_eval_auc", rank=0, split="valid", bucket="tail") == 0.71
    assert value(s, "tailrec_eval_logloss", rank=0, split="valid", bucket="tail") == 0.55
    assert value(s, "tailrec_eval_ne", rank=0, split="valid", bucket="tail") == 0.93
    assert value(s, "tailrec_checkpoint_last_success_timestamp_seconds", rank=0) == 1_700_000_000.0
    assert value(s, "tailrec_checkpoint_duration_seconds_count", rank=0) == 1
    assert value(s, "tailrec_restarts", rank=0) == 2
    assert value(s, "tailrec_process_resident_memory_bytes", rank=0) > 10 * 2**20


def test_eval_only_exported_by_rank0_and_labels_validated(exporter):
    m = exporter(rank=1)
    m.on_eval("valid", "all", auc=0.7, logloss=0.5, ne=0.9)
    assert not any(name.startswith("tailrec_eval") for name, _ in scrape(m.url))
    with pytest.raises(ValueError):
        m.on_eval("valid", "user_42", 0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        m.on_optimizer_stats("t", "cfsgd", {"p75": 1.0}, None)


def test_every_series_has_rank_and_only_bounded_labels(exporter):
    m = exporter(rank=0)
    m.on_step(8, 0.01, 0.0, 0.6, lr={"t": 0.1})
    m.on_optimizer_stats("t", "cfsgd", {"p50": 1}, {"p50": 0.2, "active_ratio": 0.1})
    m.on_eval("test", "head", 0.8, 0.4, 0.9)
    m.on_checkpoint(1.0, 1.0)
    m.on_restart(0)
    m.update_memory()
    s = scrape(m.url)
    names = {name for name, _ in s if not name.endswith("_created")}
    assert names <= SCRAPE_METRIC_NAMES
    assert all(n.startswith("tailrec_") for n in names)
    for name, labels in s:
        keys = {k for k, _ in labels}
        assert "rank" in keys, name
        assert keys <= LABEL_NAMES | {"le"}, (name, keys)
    assert not LABEL_NAMES & {"id", "step", "file", "path", "epoch"}


def test_two_exporters_in_one_process_are_independent(exporter):
    a, b = exporter(rank=0), exporter(rank=1, local_rank=1)
    a.on_step(10, 0.01, 0.0, 1.0)
    sa, sb = scrape(a.url), scrape(b.url)
    assert value(sa, "tailrec_train_examples_total", rank=0) == 10
    assert ("tailrec_train_examples_total", frozenset({("rank", "0")})) not in sb


def test_port_in_use_is_a_clear_error(exporter):
    a = exporter()
    with pytest.raises(OSError, match="metrics.base_port"):
        PrometheusMetrics(a.cfg, rank=1, local_rank=0, world_size=2)


def test_build_metrics_disabled_is_null_and_both_satisfy_protocol(exporter):
    null = build_metrics(MetricsConfig(enabled=False), 0, 0, 1)
    assert isinstance(null, NullMetrics) and isinstance(null, MetricsSink)
    null.on_step(1, 0.1, 0.0, 0.5)
    null.push_end_of_run(True, 1.0)
    null.close()
    assert isinstance(exporter(), MetricsSink)


class _Gateway(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def _record(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        _Gateway.requests.append((self.command, self.path, body))
        self.send_response(200)
        self.end_headers()

    do_POST = do_PUT = _record

    def log_message(self, *args):
        pass


def test_push_end_of_run_posts_to_pushgateway(exporter):
    gw = http.server.HTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=gw.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        _Gateway.requests.clear()
        m0 = exporter(rank=0, pushgateway=f"127.0.0.1:{gw.server_address[1]}")
        m1 = exporter(rank=1, local_rank=1, pushgateway=m0.cfg.pushgateway)
        m1.push_end_of_run(True, 5.0)  # job-level fact: only rank 0 pushes
        assert _Gateway.requests == []
        m0.push_end_of_run(True, 12.5)
        m0.push_end_of_run(False, 3.0)
    finally:
        gw.shutdown()
        gw.server_close()
    (method, path, body), (_, _, failed) = _Gateway.requests
    assert method == "POST" and path == "/metrics/job/tailrec"  # POST keeps the last success time
    ok = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}
    assert ok["tailrec_run_success"] == 1 and ok["tailrec_run_duration_seconds"] == 12.5
    assert ok["tailrec_run_last_success_timestamp_seconds"] > 1.6e9
    bad = {s.name: s.value for f in text_string_to_metric_families(failed) for s in f.samples}
    assert bad["tailrec_run_success"] == 0 and "tailrec_run_last_success_timestamp_seconds" not in bad
    assert set(ok) <= METRIC_NAMES


def test_metric_names_follow_conventions():
    for n in METRIC_NAMES:
        assert n.startswith("tailrec_")
    assert "tailrec_train_examples_total" in METRIC_NAMES
    assert "tailrec_train_step_duration_seconds_bucket" in METRIC_NAMES
    assert "tailrec_dataloader_wait_seconds_total" in METRIC_NAMES


def test_information_abundance_gauge_rank0_bounded_buckets(exporter):
    m = exporter(rank=0)
    m.on_collapse("movie_id", "all", 7.5)
    m.on_collapse("movie_id", "tail", 4.25)
    s = scrape(m.url)
    assert value(s, "tailrec_embedding_information_abundance", rank=0, table="movie_id", bucket="all") == 7.5
    assert value(s, "tailrec_embedding_information_abundance", rank=0, table="movie_id", bucket="tail") == 4.25
    with pytest.raises(ValueError, match="collapse bucket"):
        m.on_collapse("movie_id", "twin", 1.0)   # a planted group is not a row group of a table
    other = exporter(rank=1)
    other.on_collapse("movie_id", "all", 3.0)   # global values: rank 0 exports them
    assert not any(name.startswith("tailrec_embedding_information") for name, _ in scrape(other.url))
    NullMetrics().on_collapse("movie_id", "all", 1.0)
