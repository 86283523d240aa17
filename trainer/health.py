"""Liveness that exists in every mode (metrics on or off): each rank's trainer touches a heartbeat file
at start-up, every log step, and around evaluations and checkpoints; ``python -m trainer.health``
(the Docker HEALTHCHECK) exits 0 while local rank 0's heartbeat is fresh.

Files: ``$TAILREC_HEARTBEAT_DIR`` (default: the system temp dir) ``/tailrec-heartbeat-<local rank>``.
Fresh: younger than ``$TAILREC_HEALTH_MAX_AGE`` seconds (default 900: an evaluation or a checkpoint
of a large model can take minutes without a training step).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("tailrec.health")


def heartbeat_path(local_rank: int = 0) -> Path:
    root = Path(os.environ.get("TAILREC_HEARTBEAT_DIR", tempfile.gettempdir()))
    return root / f"tailrec-heartbeat-{local_rank}"


class Heartbeat:
    def __init__(self, local_rank: int):
        self.path = heartbeat_path(local_rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one temporary name per writer: two jobs on one host (the default directory is shared) once
        # raced on a common "<name>.tmp" and one of them crashed in the rename
        self._tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        self._warned = False

    def beat(self, what: str = "") -> None:
        try:
            self._tmp.write_text(f"{time.time():.3f} {what}\n")
            self._tmp.replace(self.path)      # atomic: the checker never reads half a file
        except OSError as e:                  # liveness must never stop the training it reports on
            if not self._warned:
                log.warning("heartbeat %s not written (%s); the health check will report this trainer as stuck",
                            self.path, e)
                self._warned = True


def check(local_rank: int = 0, max_age: float | None = None, now: float | None = None) -> tuple[bool, str]:
    max_age = float(os.environ.get("TAILREC_HEALTH_MAX_AGE", 900)) if max_age is None else max_age
    path = heartbeat_path(local_rank)
    try:
        beat = float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False, f"no heartbeat at {path} (trainer not started, or not a training container)"
    age = (time.time() if now is None else now) - beat
    if age > max_age:
        return False, f"heartbeat {path} is {age:.0f}s old (> {max_age:.0f}s): the trainer looks stuck"
    return True, f"heartbeat {age:.0f}s old"


def main() -> int:
    ok, msg = check()
    print(msg)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
