"""Raw line readers shared by the converters.

Files are read as bytes, line by line (plain or ``.gz``), so memory stays constant in the number of
rows and decoding errors can be reported per line by the row parsers. Row-level problems are raised
as ``RowError`` by the parsers; ``RowSink`` turns them into a ``DataError`` (default) or a line in
``rejects.tsv`` (``skip_bad_rows``). File-level problems (missing, empty, truncated ``.gz``) are always
a ``DataError``: the rest of the file cannot be trusted.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator

from data.errors import DataError

REJECTS_FILE = "rejects.tsv"
REJECTS_HEADER = ("file", "line", "field", "reason", "raw")


class RowError(Exception):
    """A bad input row; ``reason`` is a short code used in ``manifest.rejects.by_reason``."""

    def __init__(self, field: str | None, reason: str, message: str):
        super().__init__(message)
        self.field, self.reason, self.message = field, reason, message


def _open_binary(path: Path):
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "not a regular file")
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def iter_lines(path: str | Path, progress: bool | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(1-based line number, raw bytes without the line ending)``.

    Raises DataError for a missing or empty file, and for a truncated/corrupt ``.gz`` naming the last
    line read completely.
    """
    path = Path(path)
    lineno = 0
    with _open_binary(path) as f:
        bar = _progress_bar(path, progress)
        try:
            for raw in f:
                lineno += 1
                if bar is not None and lineno % 8192 == 0:
                    bar.update(8192)
                yield lineno, raw.rstrip(b"\r\n")
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DataError(path, f"truncated or corrupt compressed file after {lineno} complete lines ({e})",
                            line=lineno + 1) from None
        finally:
            if bar is not None:
                bar.update(lineno % 8192)
                bar.close()
    if lineno == 0:
        raise DataError(path, "empty file")


def _progress_bar(path: Path, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()    # no bars in logs or tests
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(desc=path.name, unit=" lines", unit_scale=True, leave=False, file=sys.stderr)


def decode(raw: bytes, encoding: str) -> str:
    """Decode one line; a bad byte is a row error (reason ``encoding``) naming the byte offset."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise RowError(None, "encoding", f"invalid {encoding} byte 0x{raw[e.start]:02x} at column {e.start + 1}") \
            from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RowSink:
    """Decides what happens to a bad row: raise DataError, or log it to ``rejects.tsv`` and count it.

    ``record=False`` is used on a first (counting) pass: bad rows are skipped without logging, because
    the writing pass meets the same rows again and logs them once.
    """

    def __init__(self, out_dir: str | Path | None, skip_bad_rows: bool, record: bool = True):
        self.skip, self.record = skip_bad_rows, record
        self.path = Path(out_dir) / REJECTS_FILE if out_dir is not None else None
        self.by_reason: Counter[str] = Counter()
        self._f = None
        self._w = None

    def bad(self, path: Path, lineno: int, err: RowError, raw: bytes) -> None:
        if not self.skip:
            raise DataError(path, err.message, line=lineno, field=err.field)
        if not self.record:
            return
        if self._w is None:
            self._f = open(self.path, "w", encoding="utf-8", newline="")
            self._w = csv.writer(self._f, dialect="excel-tab", lineterminator="\n")
            self._w.writerow(REJECTS_HEADER)
        text = raw.decode("utf-8", errors="backslashreplace")
        self._w.writerow((path.name, lineno, err.field or "", f"{err.reason}: {err.message}", text))
        self.by_reason[err.reason] += 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def summary(self) -> dict:
        count = sum(self.by_reason.values())
        return {"count": count, "file": REJECTS_FILE if count else None,
                "by_reason": dict(sorted(self.by_reason.items()))}


def read_rejects(path: str | Path) -> list[dict]:
    """Rows of a ``rejects.tsv`` as dicts (tabs inside raw lines are quoted by the csv writer)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, dialect="excel-tab"))
