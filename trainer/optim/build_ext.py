"""Build the C++ op ahead of time: `python -m trainer.optim.build_ext [--require]`.

`make setup` and the Docker image run it so that no training run compiles (about 1-2 minutes
on first use otherwise). The build lands where kernel.load_extension looks for it
($TAILREC_EXT_DIR, else ~/.cache/tailrec_ext). Without a compiler it says so and exits 0 (the
pure-torch path still works), unless --require (the image: a missing op is a build error).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.optim.build_ext")
    p.add_argument("--require", action="store_true", help="exit 1 when the op cannot be built")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from trainer.optim import kernel

    name, build = kernel.ext_build_dir()
    t0 = time.perf_counter()
    ext = kernel.load_extension()
    if ext is None:
        print("tailrec C++ op NOT built (see above); the pure-torch path will be used on CPU", file=sys.stderr)
        return 1 if a.require else 0
    print(f"tailrec C++ op ready: {build}/{name}.so ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
