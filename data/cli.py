"""``tailrec generate | convert | stats``: the data subcommands.

``register(subparsers)`` is called by the top-level ``tailrec`` parser (trainer/cli.py); ``main(argv)``
builds a parser with only these subcommands (tests, ``python -m data.cli``). Handlers return an exit
code: 0 success, 2 bad input or options (message on stderr naming file, line, field).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.errors import DataError


def _fail(e: Exception) -> int:
    print(f"tailrec: error: {e}", file=sys.stderr)
    return 2


def _common_opts(args) -> dict:
    return dict(seed=args.seed, row_group_size=args.row_group_size, compression=args.compression,
                skip_bad_rows=args.skip_bad_rows, stats=not args.no_stats,
                progress=False if args.no_progress else None, overwrite=args.overwrite, workers=args.workers,
                engine=args.engine)


def _convert(args) -> int:
    from data.convert import (CriteoOptions, MovieLensOptions, OptionsError, convert_criteo,
                              convert_movielens)
    try:
        if args.dataset == "movielens":
            if len(args.src) != 1:
                raise OptionsError("movielens takes one --src directory")
            opts = MovieLensOptions(preset=args.preset, drop_neutral=not args.keep_neutral,
                                    min_count=args.min_count or 1, history=args.history,
                                    history_ties=args.history_ties, **_common_opts(args))
            m = convert_movielens(args.src[0], args.out, opts)
        else:
            opts = CriteoOptions(mode=args.mode, min_count=args.min_count or 10, hash_size=args.hash_size,
                                 split=args.split, max_ind_range=args.max_ind_range, **_common_opts(args))
            m = convert_criteo(args.src, args.out, opts)
    except (DataError, OptionsError) as e:
        return _fail(e)
    for name, s in m.splits.items():
        rate = s.positives / s.rows if s.rows else 0.0
        print(f"{name}: {s.rows} rows, {rate:.4f} positive")
    if m.rejects["count"]:
        print(f"rejected {m.rejects['count']} bad rows -> {Path(args.out) / m.rejects['file']}")
    return 0


def _generate(args) -> int:
    from data import generate
    try:
        if args.format == "movielens":
            info = generate.generate_movielens(args.out, rows=args.rows, seed=args.seed, **_params(args.param))
        else:
            out = Path(args.out)
            if out.suffix not in (".txt", ".gz"):     # a directory: Kaggle file name inside it
                out = out / ("train.txt.gz" if args.gz else "train.txt")
            info = generate.generate_criteo(out, rows=args.rows, seed=args.seed, gz=args.gz)
    except (DataError, ValueError) as e:
        return _fail(e)
    print({k: v for k, v in info.items() if not isinstance(v, (list, dict))})
    return 0


def _params(items: list[str]) -> dict:
    """``--param NAME=VALUE`` (repeatable) -> generator keyword arguments (numbers)."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            out[name] = (int(value) if value.lstrip("-").isdigit() else float(value)) if sep else None
        except ValueError:
            out[name] = None
        if out[name] is None:
            raise ValueError(f"--param {item!r}: expected NAME=NUMBER")
    return out


def _stats(args) -> int:
    from data.stats import format_stats
    try:
        print(format_stats(args.dir))
    except DataError as e:
        return _fail(e)
    return 0


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="raw MovieLens / Criteo files -> Parquet dataset + manifest + stats")
    c.add_argument("dataset", choices=["movielens", "criteo"])
    c.add_argument("--src", required=True, nargs="+", help="MovieLens: directory; Criteo: files or a directory")
    c.add_argument("--out", required=True, help="output dataset directory")
    c.add_argument("--preset", default="full", choices=["full", "paper7"], help="MovieLens feature set")
    c.add_argument("--keep-neutral", action="store_true", help="MovieLens: keep rating 3 rows (label 0)")
    c.add_argument("--history", type=int, default=0,
                   help="MovieLens: add a 'history' column, the user's previous N movies (data/history.py)")
    c.add_argument("--history-ties", default="strict", choices=["strict", "line"],
                   help="MovieLens history: same-timestamp ratings never see each other (strict) or by line order")
    c.add_argument("--mode", default="vocab", choices=["vocab", "hash"], help="Criteo categorical ids")
    c.add_argument("--min-count", "--frequency-threshold", dest="min_count", type=int, default=None,
                   help="vocab threshold: rarer values share the OOV id (Criteo 10, MovieLens 1)")
    c.add_argument("--hash-size", type=int, default=1 << 20, help="Criteo hash mode: buckets per feature")
    c.add_argument("--max-ind-range", type=int, default=0,
                   help="Criteo vocab mode: ids modulo this cap (DLRM's --max-ind-range); 0 = no cap")
    c.add_argument("--split", default="random", choices=["random", "day"], help="Criteo: day = last file is valid/test")
    c.add_argument("--row-group-size", type=int, default=65536)
    c.add_argument("--seed", type=int, default=42, help="split seed")
    c.add_argument("--compression", default="zstd", choices=["zstd", "snappy"])
    c.add_argument("--skip-bad-rows", action="store_true", help="log bad rows to rejects.tsv instead of failing")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset in --out (the new one is swapped in only once it is complete)")
    c.add_argument("--workers", type=int, default=0, help="worker processes (default 0: one per CPU core)")
    c.add_argument("--engine", default="vector", choices=["vector", "rows"],
                   help="vector: pyarrow.csv + numpy (default); rows: the reference row-by-row parser")
    c.add_argument("--no-stats", action="store_true", help="skip the stats/ pass")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=_convert)


def register(subparsers) -> None:
    """Add ``generate``, ``convert`` and ``stats`` to an argparse subparsers object."""
    g = subparsers.add_parser("generate", help="synthetic long-tail raw data (MovieLens-1M or Criteo layout)")
    g.add_argument("--format", required=True, choices=["movielens", "criteo"])
    g.add_argument("--out", required=True, help="MovieLens: directory; Criteo: directory or .txt/.gz file")
    g.add_argument("--rows", type=int, default=200_000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--gz", action="store_true", help="Criteo: gzip the output")
    g.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="MovieLens world parameter (data.generate.ML_DEFAULTS), e.g. logit_scale=0.35 for a "
                        "harder world; repeatable")
    g.set_defaults(func=_generate)
    _add_convert(subparsers)
    s = subparsers.add_parser("stats", help="print the long-tail profile of a converted dataset")
    s.add_argument("dir")
    s.set_defaults(func=_stats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tailrec", description=__doc__)
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
