"""Per-rank metrics export: a small ``MetricsSink`` interface, a Prometheus exporter, a no-op sink.

Each rank serves ``/metrics`` on ``cfg.host:cfg.base_port + LOCAL_RANK`` (127.0.0.1 by default:
exposing training internals on all interfaces is an explicit choice, e.g. ``--metrics.host=0.0.0.0``
inside a pod). Every series carries a ``rank`` label; the other labels have bounded values only
(table, optimizer, split, bucket, percentile) -- never ids, steps or file names.

Who calls what (the training loop):
- every step: ``on_step(examples, step_seconds, data_wait_seconds, loss, lr)``; ``step_seconds`` is
  the wall time of the whole iteration *including* the data wait, so the data-wait fraction is
  ``rate(tailrec_dataloader_wait_seconds_total) / rate(tailrec_train_step_duration_seconds_sum)``.
- every ``log_every`` steps: ``on_optimizer_stats(...)`` per table, ``update_memory()``.
- after evaluation: ``on_eval(split, bucket, auc, logloss, ne)``; only rank 0 exports (values are
  global, all-gathered), the other ranks ignore the call.
- ``on_checkpoint`` after a complete save, ``on_restart`` once at start-up, ``push_end_of_run`` and
  ``close()`` at the end (also on error).

``METRIC_NAMES`` lists every exported series name (histogram ``_bucket/_sum/_count`` included) so the
Grafana dashboard test can check its queries against this module.
"""
from __future__ import annotations

import os
import resource
import sys
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, pushadd_to_gateway

from data.manifest import SPLITS
from trainer.config import MetricsConfig
from trainer.evaluation import RESULT_GROUPS as BUCKETS   # eval label values (bounded)
# Percentiles over the rows a step touched, as kernel_stats reports them (p50, p90, p99; max = p100).
# One aggregation per metric, labelled `percentile` ("quantile" is reserved for summaries: promtool).
PERCENTILES = {"p50": "p50", "p90": "p90", "p99": "p99", "max": "p100"}

# `_created` series (one per counter/histogram) are noise for our dashboards: not exported at all.
disable_created_metrics()

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_CKPT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

# name (as passed to prometheus_client) -> (kind, help, labels besides "rank").
# One table drives both construction and METRIC_NAMES, so they cannot disagree.
_SPECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tailrec_train_examples": ("counter", "Training examples processed by this rank", ()),
    "tailrec_train_steps": ("counter", "Training steps completed by this rank", ()),
    "tailrec_train_step_duration_seconds": (
        "histogram", "Wall time of one training iteration, data wait included", ()),
    "tailrec_dataloader_wait_seconds": ("counter", "Time spent waiting for the next batch", ()),
    "tailrec_train_loss": ("gauge", "Training loss of the last step (this rank's batch)", ()),
    "tailrec_embedding_learning_rate": (
        "gauge", "Current base learning rate per embedding table ('dense' = dense optimizer)", ("table",)),
    "tailrec_cfsgd_row_frequency": (
        "gauge", "Percentiles of the CF-SGD per-row frequency counters over the rows touched in the last step "
        "on this rank's shard", ("table", "optimizer", "percentile")),
    "tailrec_lexico_lambda": (
        "gauge", "Percentiles of the item-wise lexico multipliers lambda_i over the rows updated in the last step",
        ("table", "optimizer", "percentile")),
    "tailrec_lexico_barrier_active_ratio": (
        "gauge", "Fraction of touched rows whose lexico barrier is active", ("table", "optimizer")),
    "tailrec_eval_auc": ("gauge", "Global evaluation AUC (rank 0 exports)", ("split", "bucket")),
    "tailrec_eval_logloss": ("gauge", "Global evaluation log loss (rank 0 exports)", ("split", "bucket")),
    "tailrec_eval_ne": ("gauge", "Global normalized entropy (rank 0 exports)", ("split", "bucket")),
    "tailrec_process_resident_memory_bytes": ("gauge", "Resident set size of this rank's process", ()),
    "tailrec_cuda_max_memory_allocated_bytes": (
        "gauge", "torch.cuda.max_memory_allocated of this rank's device", ()),
    "tailrec_checkpoint_last_success_timestamp_seconds": (
        "gauge", "Unix time of the last complete checkpoint", ()),
    "tailrec_checkpoint_duration_seconds": ("histogram", "Time to write one checkpoint", ()),
    "tailrec_restarts": ("gauge", "Elastic restarts of this job so far (TORCHELASTIC_RESTART_COUNT)", ()),
}
# Pushed once at the end of a run (Pushgateway), never scraped.
_PUSH_SPECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tailrec_run_success": ("gauge", "1 if the run finished successfully, else 0", ()),
    "tailrec_run_duration_seconds": ("gauge", "Wall time of the whole run", ()),
    "tailrec_run_last_success_timestamp_seconds": ("gauge", "Unix time of the last successful run", ()),
}


def _exported(name: str, kind: str) -> list[str]:
    # _created series are not exported (disable_created_metrics above).
    if kind == "counter":
        return [name + "_total"]
    if kind == "histogram":
        return [name + "_bucket", name + "_sum", name + "_count"]
    return [name]


SCRAPE_METRIC_NAMES = frozenset(n for k, (kind, _, _) in _SPECS.items() for n in _exported(k, kind))
PUSH_METRIC_NAMES = frozenset(n for k, (kind, _, _) in _PUSH_SPECS.items() for n in _exported(k, kind))
METRIC_NAMES = SCRAPE_METRIC_NAMES | PUSH_METRIC_NAMES
LABEL_NAMES = frozenset({"rank"} | {lbl for _, _, lbls in _SPECS.values() for lbl in lbls})


def _build(specs: dict, registry: CollectorRegistry) -> dict:
    kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
    out = {}
    for name, (kind, doc, labels) in specs.items():
        kw = {}
        if kind == "histogram":
            kw["buckets"] = _CKPT_BUCKETS if "checkpoint" in name else _STEP_BUCKETS
        out[name] = kinds[kind](name, doc, ("rank", *labels), registry=registry, **kw)
    return out


def _percentile(what: str, key: str) -> str:
    if key not in PERCENTILES:
        extra = ", 'active_ratio'" if what == "lambda" else ""
        raise ValueError(f"{what} statistic {key!r} is not one of {list(PERCENTILES)}{extra}")
    return PERCENTILES[key]


def rss_bytes() -> int:
    """Current resident set size; /proc when present, else peak RSS from getrusage (Linux: KiB)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 -- scrapes every 15 s would flood the logs
        pass


@runtime_checkable
class MetricsSink(Protocol):
    def on_step(self, examples: int, step_seconds: float, data_wait_seconds: float, loss: float,
                lr: dict[str, float] | None = None) -> None: ...

    def on_optimizer_stats(self, table: str, optimizer: str, counter_quantiles: dict[str, float] | None,
                           lambda_stats: dict[str, float] | None) -> None: ...

    def on_eval(self, split: str, bucket: str, auc: float, logloss: float, ne: float) -> None: ...

    def on_checkpoint(self, duration_seconds: float, timestamp: float) -> None: ...

    def on_restart(self, count: int) -> None: ...

    def update_memory(self) -> None: ...

    def push_end_of_run(self, success: bool, duration_seconds: float) -> None: ...

    def close(self) -> None: ...


class NullMetrics:
    """Metrics disabled: every call is a no-op."""

    def on_step(self, examples, step_seconds, data_wait_seconds, loss, lr=None) -> None:
        pass

    def on_optimizer_stats(self, table, optimizer, counter_quantiles, lambda_stats) -> None:
        pass

    def on_eval(self, split, bucket, auc, logloss, ne) -> None:
        pass

    def on_checkpoint(self, duration_seconds, timestamp) -> None:
        pass

    def on_restart(self, count) -> None:
        pass

    def update_memory(self) -> None:
        pass

    def push_end_of_run(self, success, duration_seconds) -> None:
        pass

    def close(self) -> None:
        pass


class PrometheusMetrics:
    """Serves this rank's metrics on ``cfg.host:cfg.base_port + local_rank`` from its own registry."""

    def __init__(self, cfg: MetricsConfig, rank: int, local_rank: int, world_size: int):
        self.cfg = cfg
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.port = cfg.base_port + local_rank
        # Own registry: several exporters can live in one process (tests), and the global
        # registry's default process/platform collectors stay out of our namespace.
        self.registry = CollectorRegistry(auto_describe=True)
        self._m = _build(_SPECS, self.registry)
        self._r = str(rank)
        self.buckets = tuple(BUCKETS)   # eval label values; a run's own eval groups join via allow_groups
        try:
            # Our own server loop (not start_http_server) so close() returns within ~50 ms.
            self._server = make_server(cfg.host, self.port, make_wsgi_app(self.registry),
                                       ThreadingWSGIServer, handler_class=_QuietHandler)
        except OSError as e:
            raise OSError(f"metrics: cannot serve on {cfg.host}:{self.port} (metrics.base_port="
                          f"{cfg.base_port} + local rank {local_rank}): {e}") from e
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"metrics-{self.port}", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}/metrics"

    def _labels(self, name: str, **labels: str):
        return self._m[name].labels(rank=self._r, **labels)

    def on_step(self, examples: int, step_seconds: float, data_wait_seconds: float, loss: float,
                lr: dict[str, float] | None = None) -> None:
        self._labels("tailrec_train_examples").inc(examples)
        self._labels("tailrec_train_steps").inc()
        self._labels("tailrec_train_step_duration_seconds").observe(step_seconds)
        self._labels("tailrec_dataloader_wait_seconds").inc(max(data_wait_seconds, 0.0))
        self._labels("tailrec_train_loss").set(loss)
        for table, value in (lr or {}).items():
            self._labels("tailrec_embedding_learning_rate", table=table).set(value)

    def on_optimizer_stats(self, table: str, optimizer: str, counter_quantiles: dict[str, float] | None,
                           lambda_stats: dict[str, float] | None) -> None:
        for key, value in (counter_quantiles or {}).items():
            self._labels("tailrec_cfsgd_row_frequency", table=table, optimizer=optimizer,
                         percentile=_percentile("counter", key)).set(value)
        for key, value in (lambda_stats or {}).items():
            if key == "active_ratio":
                self._labels("tailrec_lexico_barrier_active_ratio", table=table, optimizer=optimizer).set(value)
            else:
                self._labels("tailrec_lexico_lambda", table=table, optimizer=optimizer,
                             percentile=_percentile("lambda", key)).set(value)

    def allow_groups(self, names: tuple[str, ...]) -> None:
        """The run's evaluation groups (transfer.eval_groups, at most MAX_EVAL_GROUPS) as bucket labels."""
        self.buckets = tuple(dict.fromkeys((*self.buckets, *names)))

    def on_eval(self, split: str, bucket: str, auc: float, logloss: float, ne: float) -> None:
        if split not in SPLITS or bucket not in self.buckets:
            raise ValueError(f"eval labels must be split in {SPLITS}, bucket in {self.buckets}; got {split!r}, {bucket!r}")
        if self.rank != 0:  # global values: one exporter avoids N identical series
            return
        self._labels("tailrec_eval_auc", split=split, bucket=bucket).set(auc)
        self._labels("tailrec_eval_logloss", split=split, bucket=bucket).set(logloss)
        self._labels("tailrec_eval_ne", split=split, bucket=bucket).set(ne)

    def on_checkpoint(self, duration_seconds: float, timestamp: float) -> None:
        self._labels("tailrec_checkpoint_duration_seconds").observe(duration_seconds)
        self._labels("tailrec_checkpoint_last_success_timestamp_seconds").set(timestamp)

    def on_restart(self, count: int) -> None:
        self._labels("tailrec_restarts").set(count)

    def update_memory(self) -> None:
        self._labels("tailrec_process_resident_memory_bytes").set(rss_bytes())
        torch = sys.modules.get("torch")  # no import here: torch is loaded by the trainer anyway
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            self._labels("tailrec_cuda_max_memory_allocated_bytes").set(torch.cuda.max_memory_allocated())

    def push_end_of_run(self, success: bool, duration_seconds: float) -> None:
        """Push run outcome to ``cfg.pushgateway`` (rank 0 only: it is a job-level fact)."""
        if not self.cfg.pushgateway or self.rank != 0:
            return
        registry = CollectorRegistry()
        m = _build(_PUSH_SPECS, registry)
        m["tailrec_run_success"].labels(rank=self._r).set(1 if success else 0)
        m["tailrec_run_duration_seconds"].labels(rank=self._r).set(duration_seconds)
        if success:
            m["tailrec_run_last_success_timestamp_seconds"].labels(rank=self._r).set(time.time())
        # pushadd (POST) replaces only these names: a failed run keeps the last success timestamp.
        pushadd_to_gateway(self.cfg.pushgateway, job="tailrec", registry=registry, timeout=10)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def build_metrics(cfg: MetricsConfig, rank: int, local_rank: int, world_size: int) -> MetricsSink:
    """The sink the trainer uses: Prometheus when ``cfg.enabled``, else a no-op."""
    if not cfg.enabled:
        return NullMetrics()
    return PrometheusMetrics(cfg, rank, local_rank, world_size)


def restart_count() -> int:
    """torchrun's restart counter for this worker group (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
