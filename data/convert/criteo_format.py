"""The Criteo raw format and its row parser (the reference the vectorised path must agree with).

Each line: label, I1..I13, C1..C26, tab-separated, empty fields allowed. ``parse_line`` checks one
line and names the field at fault; ``resolve_inputs`` turns the ``--src`` arguments into files.
"""
from __future__ import annotations

import re
from pathlib import Path

from data.errors import DataError
from data.readers import RowError, parse_int

DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
COLUMNS = ["label", *DENSE, *SPARSE]
_HEX = re.compile(r"[0-9a-fA-F]{1,16}")
_DAY = re.compile(r"day_(\d+)(\.gz)?$")
_INT64 = (-(1 << 63), (1 << 63) - 1)


def resolve_inputs(src) -> list[Path]:
    """A file, a list of files, or a directory holding ``train.txt[.gz]`` or ``day_N[.gz]`` files
    (the Criteo 1TB layout, ``day_0`` .. ``day_23``, taken in day order)."""
    items = [src] if isinstance(src, (str, Path)) else list(src)
    if not items:
        raise DataError("<inputs>", "no Criteo input files given")
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            days = sorted((p for p in item.iterdir() if _DAY.match(p.name)), key=lambda p: int(_DAY.match(p.name)[1]))
            found = days or [p for p in (item / "train.txt", item / "train.txt.gz") if p.is_file()]
            if not found:
                raise DataError(item, "directory holds no train.txt[.gz] or day_N[.gz] files")
            out += found
        elif not item.is_file():
            raise DataError(item, "file not found")
        else:
            out.append(item)
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise DataError(out[0].parent, f"input file names must be distinct (checksums are keyed by name): {names}")
    return out


def parse_line(raw: bytes) -> tuple[float, list[int], list[int | None]]:
    """``(label, 13 ints (missing -> 0), 26 categorical ints (missing -> None))``; RowError naming the field.

    Integers: ``-?[0-9]+`` within int64 (no ``1_000``, no spaces); ids: 1-16 hex digits, either case."""
    parts = raw.decode("latin-1").split("\t")     # latin-1 never fails; a stray byte fails the field check
    if len(parts) != 40:
        field = COLUMNS[len(parts)] if len(parts) < 40 else "column 41"
        raise RowError(field, "columns", f"expected 40 tab-separated fields, got {len(parts)}")
    if parts[0] not in ("0", "1"):
        raise RowError("label", "bad_label", f"label {parts[0]!r} is not 0 or 1")
    ints = []
    for name, s in zip(DENSE, parts[1:14]):
        x = parse_int(s, name) if s else 0
        if not _INT64[0] <= x <= _INT64[1]:
            raise RowError(name, "out_of_range", f"{s!r} is outside the int64 range")
        ints.append(x)
    cats: list[int | None] = []
    for name, s in zip(SPARSE, parts[14:]):
        if not s:
            cats.append(None)
        elif _HEX.fullmatch(s):
            cats.append(int(s, 16))
        else:
            raise RowError(name, "not_hex", f"{s!r} is not a hex string of 1-16 digits")
    return float(parts[0]), ints, cats
