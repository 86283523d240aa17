"""The ``tailrec`` console script. Exit codes: 0 success, 2 bad input or config, 1 internal error."""
from __future__ import annotations

import argparse
import faulthandler
import sys

from data.errors import DataError
from trainer.config_base import ConfigError
from trainer.errors import RunError
from trainer.logs import LEVELS


def _train(args, overrides: list[str]) -> int:
    from trainer.config import load_config
    from trainer.train import run

    run(load_config(args.config, overrides), log_level=args.log_level)
    return 0


def _evaluate(args, overrides: list[str]) -> int:
    from trainer.evaluate_checkpoint import run_evaluate

    return run_evaluate(args.checkpoint, args.split, args.config, overrides, predictions=args.predictions)


def _demo(args, overrides: list[str]) -> int:
    from trainer.experiments.demo import run_demo

    return run_demo(args.out, args.rows, args.nproc, overrides)


def _bench(args, overrides: list[str]) -> int:
    import importlib

    module = {"data": "trainer.experiments.bench_data", "kernel": "trainer.experiments.bench_kernel", "train": "trainer.experiments.bench_train"}[args.what]
    return importlib.import_module(module).main(overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tailrec", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    from data.cli import register as register_data

    register_data(sub)
    t = sub.add_parser("train", help="train one run (1 rank, or N under torchrun); extra --a.b=c override the config")
    t.add_argument("--config", required=True)
    t.add_argument("--log-level", default=None, type=str.upper, choices=LEVELS,
                   help="our loggers' level (default $LOGLEVEL or INFO); DEBUG also shows the libraries'")
    t.set_defaults(func=_train, takes_overrides=True)
    e = sub.add_parser("evaluate", help="evaluate a checkpoint on a split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", default="test", choices=["train", "valid", "test"])
    e.add_argument("--config", default=None, help="default: the config saved with the run")
    e.add_argument("--predictions", default=None, metavar="FILE",
                   help="also write per-example predictions as Parquet (one file; a directory of parts on N ranks)")
    e.set_defaults(func=_evaluate, takes_overrides=True)
    d = sub.add_parser("demo", help="generate the default long-tail dataset, convert it, print stats, train")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--rows", type=int, default=200_000)
    d.add_argument("--nproc", type=int, default=2, help="ranks (torchrun, gloo on CPU)")
    d.set_defaults(func=_demo, takes_overrides=True)
    b = sub.add_parser("bench", help="benchmarks, printed side by side with their baselines")
    b.add_argument("what", choices=["data", "kernel", "train"])
    b.set_defaults(func=_bench, takes_overrides=True)
    from trainer.experiments.ablate import register as register_ablate
    from trainer.experiments.compare import register as register_compare
    from trainer.experiments.tune import register as register_tune

    register_ablate(sub)
    register_tune(sub)
    register_compare(sub)
    return p


def _enable_faulthandler() -> None:
    """A native abort (kernel, collective) then prints every thread's Python stack to stderr. Left
    alone where a host (pytest) already set it up or stderr has no file descriptor."""
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
        pass


def main(argv: list[str] | None = None) -> int:
    _enable_faulthandler()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if getattr(args, "takes_overrides", False):
            return args.func(args, rest)
        return args.func(args)
    except (ConfigError, DataError, RunError) as e:
        print(f"tailrec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
