"""Quiet, readable logs for a run: ours at INFO, libraries at WARNING, one rank talking.

* Our loggers (``tailrec.*`` and the module loggers of ``trainer``, ``data``, ``models``) log at the
  requested level: ``--log-level``, else ``$TAILREC_LOG_LEVEL``, else ``$LOGLEVEL`` (torchrun's
  convention), else INFO. (TorchX's dist.ddp sets LOGLEVEL=WARNING for torchrun's agent; our TorchX
  component therefore sets TAILREC_LOG_LEVEL=INFO so a job still shows its progress.)
* Every other logger (TorchRec's planner boxes, FBGEMM's "Successfully loaded", TBE argument dumps) logs
  at WARNING, unless the requested level is DEBUG: then everything is shown.
* Only rank 0 logs below WARNING, unless ``$TAILREC_LOG_ALL_RANKS=1``: the other ranks would repeat the
  same lines N times. Warnings and errors are shown on every rank, tagged with it.
* Progress bars only when stderr is a terminal (``show_progress``); records go through
  ``logging_redirect_tqdm`` (train.py) so bars and lines do not glue together.
"""
from __future__ import annotations

import logging
import os
import re
import sys

OURS = ("tailrec", "trainer", "data", "models")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s"

# Library warnings that every run prints and that need no action from a user; hidden unless DEBUG.
# (logger or warning category, start of the message, why it is harmless here)
KNOWN_BENIGN = (
    (FutureWarning, "HeuristicalStorageReservation is known to cause issues",
     "TorchRec's own default reservation; our plans are pinned by per-table constraints"),
    (FutureWarning, "`broadcast_buffers` is deprecated",
     "raised inside TorchRec's DistributedModelParallel, not by our code"),
    ("torchrec.distributed.planner.storage_reservations", "There is a known issue with TorchRec's dense tensor",
     "a dry-run estimate in the planner's storage reservation; no effect on the plan we pass"),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor",
     "TorchRec 1.8 keeps row- and column-wise shards as ShardedTensor; reading their size warns"),
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true",
     "TrainPipelineSparseDist's tracer; an informational torch notice"),
)


def resolve_level(requested: str | None = None) -> int:
    name = (requested or os.environ.get("TAILREC_LOG_LEVEL") or os.environ.get("LOGLEVEL") or "INFO").upper()
    if name not in LEVELS:
        raise ValueError(f"log level {name!r} is not one of {list(LEVELS)} (--log-level / $TAILREC_LOG_LEVEL / $LOGLEVEL)")
    return getattr(logging, name)


def setup_logging(rank: int, requested: str | None = None) -> int:
    """Configure the root handler and levels for this process; returns our effective level."""
    level = resolve_level(requested)
    if rank != 0 and os.environ.get("TAILREC_LOG_ALL_RANKS") != "1":
        level = max(level, logging.WARNING)
    _install_rank_in_logs(rank)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if level == logging.DEBUG else logging.WARNING)
    for name in OURS:
        logging.getLogger(name).setLevel(level)
    # libraries that set their own logger levels at import (torchrec, fbgemm) follow the root too
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and not name.startswith(OURS):
            logger.setLevel(logging.NOTSET)
    logging.captureWarnings(True)   # python warnings from libraries become WARNING records (one per site)
    if level > logging.DEBUG:
        _hide_known_benign()
    return level


class _StartsWith(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _hide_known_benign() -> None:
    import warnings

    for source, prefix, _why in KNOWN_BENIGN:
        if isinstance(source, type):
            warnings.filterwarnings("ignore", message=re.escape(prefix), category=source)
        else:
            logging.getLogger(source).addFilter(_StartsWith(prefix))


def show_progress(is_main: bool) -> bool:
    return is_main and sys.stderr.isatty()


def _install_rank_in_logs(rank: int) -> None:
    base = logging.getLogRecordFactory()
    base = getattr(base, "_tailrec_base", base)   # idempotent: never wrap our own factory twice

    def factory(*a, **kw):
        rec = base(*a, **kw)
        rec.rank = rank
        return rec

    factory._tailrec_base = base  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
