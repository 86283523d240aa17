"""The one launcher: the command line of a trainer process, and free local ports.

One rank runs ``python -m <module> ...``; N ranks (or any elastic restarts) run the same module under
torchrun (``python -m torch.distributed.run``): ``--standalone`` picks its own rendezvous port unless a
``master_port`` is given. The demo, the ablation grid, the benchmarks, the TorchX component (for the
trainer's own arguments: TorchX builds the torchrun part itself) and the tests all build their commands
here.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
TRAINER_MODULE = "trainer"


def trainer_args(command: str, config: str | Path | None = None, overrides: Sequence[str] = ()) -> list[str]:
    """Arguments of ``python -m trainer``: ``train --config C --a.b=c ...``."""
    args = [command]
    if config is not None:
        args += ["--config", str(config)]
    return args + [str(o) for o in overrides]


def command(args: Sequence[str], nproc: int = 1, module: str | None = TRAINER_MODULE, script: str | Path | None = None,
            max_restarts: int = 0, master_port: int | None = None, python: str = sys.executable) -> list[str]:
    """``python -m module args`` (or ``python script args``), under torchrun when ``nproc > 1`` or
    ``max_restarts > 0``."""
    if (module is None) == (script is None):
        raise ValueError("give exactly one of module / script")
    target = ["-m", module] if module is not None else [str(script)]
    if nproc <= 1 and max_restarts <= 0:
        return [python, *target, *args]
    head = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if master_port is None:
        head.append("--standalone")
    else:
        head += ["--master_addr=127.0.0.1", f"--master_port={master_port}"]
    if max_restarts > 0:
        head.append(f"--max-restarts={max_restarts}")
    return head + target + list(args)


def trainer_command(command_name: str = "train", config: str | Path | None = None, overrides: Sequence[str] = (),
                    nproc: int = 1, **kw) -> list[str]:
    """The full command line of a trainer run (``tailrec train`` on ``nproc`` ranks)."""
    return command(trainer_args(command_name, config, overrides), nproc=nproc, **kw)


def shown(cmd: Sequence[str]) -> str:
    """A command as a shell line, with paths inside this repository written relative to it (for logs and
    the command files of reports, which must not carry this machine's absolute paths)."""
    import shlex

    root = str(REPO) + os.sep
    return shlex.join(a.replace(root, "") for a in cmd)


def subprocess_env(threads: int | None = None, **extra: str) -> dict[str, str]:
    """Environment for a launched run: this repository importable, one OpenMP thread per rank unless
    the caller set OMP_NUM_THREADS (two ranks on two cores otherwise oversubscribe), and no MASTER_*
    left over from the calling process (torchrun sets its own)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads) if threads else os.environ.get("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    env.update(extra)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on ``host`` (1-rank groups started by hand, metrics, tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_block(n: int, host: str = "127.0.0.1", tries: int = 50) -> int:
    """A base port with base .. base+n-1 all free (metrics of local rank r serve on base + r)."""
    for _ in range(tries):
        base = free_port(host)
        if base + n > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + n):
                sk = socket.socket()
                socks.append(sk)
                sk.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError(f"no block of {n} free ports on {host}")
