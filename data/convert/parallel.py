"""Worker processes for the converters: ``Pool.map`` runs module-level functions over task arguments.

Processes, not threads: most of a conversion holds the GIL between pyarrow calls. They are started
with ``spawn`` (pyarrow's thread pools do not survive ``fork``) and only when there is more than one
task and more than one worker; otherwise everything runs in this process. Results come back in task
order, and the first failing task in that order decides the error (a ``DataError`` names the file and
line), so a parallel run reports the same bad row as a sequential one.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool


class Pool:
    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self._ex: ProcessPoolExecutor | None = None

    def map(self, fn, items: list) -> list:
        """``[fn(*item) for item in items]`` (an item that is not a tuple is one argument)."""
        items = [it if isinstance(it, tuple) else (it,) for it in items]
        if self.workers == 1 or len(items) <= 1:
            return [fn(*it) for it in items]
        if self._ex is None:
            self._ex = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        futures = [self._ex.submit(fn, *it) for it in items]
        try:
            return [f.result() for f in futures]
        except BrokenProcessPool:
            raise RuntimeError("a conversion worker process died (out of memory? or a script that calls the "
                               "converter with workers > 1 lacks `if __name__ == '__main__':`); workers=1 "
                               "runs everything in this process") from None
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
