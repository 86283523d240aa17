"""Entry point of one training run (one rank alone, or every rank under torchrun / TorchX)."""
from __future__ import annotations

import logging
import os
import time

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer import config_base
from trainer.config import Config
from trainer.config_base import ConfigError
from trainer.dist import init_distributed, shutdown
from trainer.logs import setup_logging
from trainer.results import markdown, write_results

log = logging.getLogger("tailrec.train")


def _make_metrics(cfg: Config, env):
    if not cfg.metrics.enabled:
        return None
    from trainer.metrics import PrometheusMetrics, restart_count

    try:
        m = PrometheusMetrics(cfg.metrics, env.rank, env.local_rank, env.world_size)
    except OSError as e:  # port taken / not bindable: a configuration problem, exit 2
        raise ConfigError(str(e)) from None
    m.on_restart(restart_count())
    log.info("metrics on %s", m.url)
    return m


def run(cfg: Config, log_level: str | None = None) -> dict:
    setup_logging(int(os.environ.get("RANK", 0)), log_level)
    env = init_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed + env.rank)
    metrics = _make_metrics(cfg, env)
    t0, ok = time.time(), False
    try:
        from trainer.loop import Trainer  # heavy imports after the process group exists

        trainer = Trainer(cfg, env, metrics)
        if env.is_main:
            config_base.dump(cfg, f"{cfg.run_dir}/config.yaml")
            log.info("sharding plan:\n%s", trainer.plan_text)
        trainer.maybe_resume()
        with logging_redirect_tqdm():   # log lines above the progress bar, not glued to it
            results = trainer.train()
        if env.is_main:
            write_results(cfg.run_dir, results)
            print(markdown(results))
        ok = True
        return results
    finally:
        if metrics:
            metrics.push_end_of_run(ok, time.time() - t0)
            metrics.close()
        shutdown()

