"""Raw input as blocks of whole lines, cut into conversion tasks (one file or one byte range each).

A plain file larger than ``task_bytes`` is cut at line ends into byte ranges; the number of lines
before each range comes from a newline count of the ranges before it (``count_lines``, run in
parallel, a few GB/s), so every task knows the 1-based line number of its first line. A ``.gz`` file
cannot be entered in the middle: it is one task. ``iter_blocks`` then reads a task in blocks of about
``block_bytes`` that end at a line end, dropping a UTF-8 byte order mark at the start of the file,
and names the file (and the last complete line) when it is missing, empty or a truncated ``.gz``.

Line numbers follow ``data.readers.iter_lines`` exactly: lines end at ``\\n`` only, and a trailing
``\\r`` is part of the line ending, so the vectorised and the row paths number the same lines.
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data.errors import DataError
from data.readers import BOM, truncated_error

_SCAN = 1 << 16      # bytes read at a time when looking for the line end after a cut point


@dataclass(frozen=True)
class Task:
    index: int                # position in input order: names the part files, orders rejects
    path: str
    file_index: int           # ordinal of the file among the inputs (split key offset)
    start: int = 0            # byte offset of the first line (0 for .gz)
    end: int | None = None    # byte offset just past the last line; None: to the end of the file
    first_line: int = 1       # 1-based line number of the first line in the file


def is_gz(path) -> bool:
    return str(path).endswith(".gz")


def open_binary(path: Path):
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "not a regular file")
    return gzip.open(path, "rb") if is_gz(path) else open(path, "rb")


def cut_points(path: Path, task_bytes: int) -> list[int]:
    """Offsets where byte ranges start: 0, then just after the first ``\\n`` at or past each multiple."""
    size = path.stat().st_size
    cuts = [0]
    if is_gz(path) or size <= task_bytes:
        return cuts
    with open(path, "rb") as f:
        pos = task_bytes
        while pos < size:
            f.seek(pos - 1)
            nl = -1
            while nl < 0:
                buf = f.read(_SCAN)
                if not buf:
                    return cuts
                i = buf.find(b"\n")
                nl = f.tell() - len(buf) + i if i >= 0 else -1
            if nl + 1 >= size:
                break
            cuts.append(nl + 1)
            pos = nl + 1 + task_bytes
    return cuts


def count_lines(path: str, start: int, end: int) -> int:
    """Newlines in ``[start, end)`` of a plain file: the lines of a range that ends at a line end."""
    n = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            buf = f.read(min(left, 16 << 20))
            if not buf:
                break
            n += buf.count(b"\n")
            left -= len(buf)
    return n


def plan_tasks(files: list[Path], task_bytes: int, pool) -> list[Task]:
    """One task per ``.gz`` file or small plain file, one per byte range of a large plain file."""
    ranges = []                   # (file index, path, start, end)
    for fi, p in enumerate(files):
        if not Path(p).is_file():
            raise DataError(p, "file not found" if not Path(p).exists() else "not a regular file")
        cuts = cut_points(Path(p), task_bytes)
        ranges += [(fi, str(p), a, b) for a, b in zip(cuts, [*cuts[1:], None])]
    # lines before each range: newline counts of the ranges before it in the same file
    counted = [(path, a, b) for _, path, a, b in ranges if b is not None]
    counts = dict(zip(counted, pool.map(count_lines, counted))) if counted else {}
    tasks, line = [], 1
    for i, (fi, path, a, b) in enumerate(ranges):
        line = 1 if a == 0 else line
        tasks.append(Task(i, path, fi, a, b, line))
        if b is not None:
            line += counts[(path, a, b)]
    return tasks


def split_lines(block: bytes) -> list[bytes]:
    """The block's lines as ``iter_lines`` yields them (``\\n`` split, trailing ``\\r`` dropped)."""
    parts = block.split(b"\n")
    if block.endswith(b"\n"):
        parts.pop()
    return [p.rstrip(b"\r\n") for p in parts]


def iter_blocks(task: Task, block_bytes: int) -> Iterator[tuple[int, bytes, int]]:
    """Yield ``(number of the block's first line, block, its number of lines)``; blocks hold whole
    lines, the last one of a file possibly without its final ``\\n``."""
    path = Path(task.path)
    line = task.first_line
    left = None if task.end is None else task.end - task.start
    carry, first = b"", task.start == 0
    partial: list[bytes] = []          # pieces of the current read: their lines count as complete on error
    with open_binary(path) as f:
        if task.start:
            f.seek(task.start)
        try:
            while True:
                want = block_bytes if left is None else min(block_bytes, left)
                chunk = _read(f, max(want, len(BOM)) if first else want, partial) if want > 0 else b""
                if left is not None:
                    left -= len(chunk)
                if first:
                    if not chunk:
                        raise DataError(path, "empty file")
                    first = False
                    if chunk.startswith(BOM):
                        chunk = chunk[len(BOM):]
                        if not chunk:
                            continue
                if not chunk:
                    if carry:
                        yield line, carry, 1
                    return
                data = carry + chunk if carry else chunk
                cut = data.rfind(b"\n") + 1
                if cut == 0:           # a line longer than the block: read on
                    carry = data
                    continue
                block, carry = data[:cut], data[cut:]
                n = block.count(b"\n")
                yield line, block, n
                line += n
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise truncated_error(path, line - 1 + sum(p.count(b"\n") for p in partial), e) from None


def _read(f, want: int, partial: list[bytes]) -> bytes:
    """``f.read(want)`` built from ``read1`` pieces kept in ``partial``: a corrupt ``.gz`` raises in the
    middle of a read, and the lines decoded before it are still reported as complete."""
    partial.clear()
    got = 0
    while got < want:
        piece = f.read1(want - got)
        if not piece:
            break
        partial.append(piece)
        got += len(piece)
    return partial[0] if len(partial) == 1 else b"".join(partial)
