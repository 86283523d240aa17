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
import re
import shutil
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator

from data.errors import DataError

REJECTS_FILE = "rejects.tsv"
REJECTS_HEADER = ("file", "line", "field", "reason", "raw")
BOM = b"\xef\xbb\xbf"
_INT = re.compile(r"-?[0-9]+")


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

    A UTF-8 byte order mark at the start of the file is dropped (editors on Windows add one; it is not
    part of the first row). Raises DataError for a missing or empty file, and for a truncated/corrupt
    ``.gz`` naming the last line read completely.
    """
    path = Path(path)
    lineno = 0
    with _open_binary(path) as f:
        bar = _progress_bar(path, progress)
        try:
            for raw in f:
                lineno += 1
                if lineno == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                if bar is not None and lineno % 8192 == 0:
                    bar.update(8192)
                yield lineno, raw.rstrip(b"\r\n")
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise truncated_error(path, lineno, e) from None
        finally:
            if bar is not None:
                bar.update(lineno % 8192)
                bar.close()
    if lineno == 0:
        raise DataError(path, "empty file")


def truncated_error(path: Path, complete_lines: int, e: Exception) -> DataError:
    return DataError(path, f"truncated or corrupt compressed file after {complete_lines} complete lines ({e})",
                     line=complete_lines + 1)


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


def parse_int(text: str, name: str) -> int:
    """A decimal integer, optionally negative: ASCII digits only. Python's ``int()`` alone would also take
    ``1_000``, ``" 5"`` and non-ASCII digits; the vectorised converters take exactly this grammar."""
    if _INT.fullmatch(text) is None:
        raise RowError(name, "not_integer", f"{text!r} is not an integer")
    return int(text)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RowSink:
    """Decides what happens to a bad row: raise DataError, or log it to ``rejects.tsv`` and count it.

    ``record=False`` is used on a first (counting) pass: bad rows are counted but not logged, because
    the writing pass meets the same rows again and logs them once. Conversion workers write their own
    part (``name``); ``merge_rejects`` joins the parts in input order.
    """

    def __init__(self, out_dir: str | Path | None, skip_bad_rows: bool, record: bool = True,
                 name: str = REJECTS_FILE):
        self.skip, self.record = skip_bad_rows, record
        self.path = Path(out_dir) / name if out_dir is not None else None
        self.by_file: dict[str, Counter[str]] = {}
        self._f = None
        self._w = None

    def bad(self, path: Path, lineno: int, err: RowError, raw: bytes) -> None:
        if not self.skip:
            raise DataError(path, err.message, line=lineno, field=err.field)
        if not self.record:
            self.by_file.setdefault(path.name, Counter())[err.reason] += 1
            return
        if self._w is None:
            self._f = open(self.path, "w", encoding="utf-8", newline="")
            self._w = csv.writer(self._f, dialect="excel-tab", lineterminator="\n")
            self._w.writerow(REJECTS_HEADER)
        text = raw.decode("utf-8", errors="backslashreplace")
        self._w.writerow((path.name, lineno, err.field or "", f"{err.reason}: {err.message}", text))
        self.by_file.setdefault(path.name, Counter())[err.reason] += 1

    def rejected(self, path: Path) -> int:
        return sum(self.by_file.get(Path(path).name, Counter()).values())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def summary(self) -> dict:
        return rejects_summary(self.by_file)


def rejects_summary(by_file: dict[str, Counter]) -> dict:
    """The manifest's ``rejects``: totals, and the same per input file (``users.dat`` apart from
    ``ratings.dat``, one Criteo day apart from another)."""
    total: Counter[str] = Counter()
    for c in by_file.values():
        total.update(c)
    count = sum(total.values())
    return {"count": count, "file": REJECTS_FILE if count else None, "by_reason": dict(sorted(total.items())),
            "by_file": {f: {"count": sum(c.values()), "by_reason": dict(sorted(c.items()))}
                        for f, c in sorted(by_file.items()) if c}}


def merge_rejects(out_dir: Path, parts: list[Path]) -> None:
    """Concatenate the workers' reject parts (in input order) into ``rejects.tsv``; parts are removed."""
    parts = [p for p in parts if p.is_file()]
    if not parts:
        return
    with open(Path(out_dir) / REJECTS_FILE, "wb") as out:
        for i, p in enumerate(parts):
            with open(p, "rb") as f:
                header = f.readline()
                if i == 0:
                    out.write(header)
                shutil.copyfileobj(f, out)
            p.unlink()


def read_rejects(path: str | Path) -> list[dict]:
    """Rows of a ``rejects.tsv`` as dicts (tabs inside raw lines are quoted by the csv writer)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, dialect="excel-tab"))
