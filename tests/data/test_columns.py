"""The vectorised column checks against the row parsers' rules, value by value (random and edge cases):
a value the row parser rejects must make the column check return None; a good one decodes exactly."""
from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from data.convert.columns import decimal_column, hex_column, hex_text, int_column, label01
from data.convert.criteo_format import _HEX
from data.convert.movielens_format import RATING_RE
from data.readers import RowError, parse_int

EDGE = ["", "0", "-0", "7", "-12", "007", "+5", " 5", "5 ", "1_000", "0x10", "1e3", "--1", "-", "1-2", "٣",
        "9223372036854775807", "9223372036854775808", "-9223372036854775808", "12a", "\x00", "4.5"]


def col(values: list[str | None]) -> pa.Array:
    """A string column as the converters' CSV reader makes it: an empty field is null."""
    return pa.array([v if v != "" else None for v in values], pa.string())


def int_ok(s: str) -> bool:
    try:
        return -(1 << 63) <= parse_int(s, "x") < (1 << 63)
    except RowError:
        return False


@pytest.mark.parametrize("value", EDGE)
def test_int_column_agrees_with_parse_int(value):
    arr = col(["1", value, None])
    got = int_column(arr)
    if value == "" or int_ok(value):
        assert got is not None and got.tolist() == [1, parse_int(value, "x") if value else 0, 0]
    else:
        assert got is None
    assert int_column(col(["1", None]), allow_empty=False) is None


def test_int_column_random_values():
    r = random.Random(0)
    vals = [str(r.randint(-10**12, 10**12)) for _ in range(5000)]
    assert int_column(col(vals)).tolist() == [int(v) for v in vals]


def random_hex(r: random.Random) -> str:
    n = r.choice([8, 8, 8, 1, 3, 16])
    s = "".join(r.choice("0123456789abcdefABCDEF") for _ in range(n))
    return s


@pytest.mark.parametrize("width", ["eight", "mixed"])
def test_hex_column_decodes_like_python(width):
    r = random.Random(1)
    vals = [None if r.random() < 0.2 else (f"{r.getrandbits(32):08x}" if width == "eight" else random_hex(r))
            for _ in range(3000)]
    values, missing = hex_column(col(vals))
    assert missing.tolist() == [v is None for v in vals]
    assert values[~missing].tolist() == [int(v, 16) for v in vals if v is not None]


@pytest.mark.parametrize("bad", ["zz00ff11", "0x12ab34", " 1234567", "1234567g", "12345678901234567", "68fd\x0064",
                                 "68fd1\xe964", "-1234567", "+1234567", "ABCDEFG1"])
def test_hex_column_refuses_what_the_row_parser_refuses(bad):
    assert _HEX.fullmatch(bad) is None
    for other in ("68fd1e64", "1"):                    # the 8-digit lane path and the general path
        assert hex_column(col([other, bad, None])) is None


def test_label_and_decimal_columns():
    assert label01(col(["0", "1", "1"])).tolist() == [0.0, 1.0, 1.0]
    for bad in ["2", "01", None, " 1", "1.0"]:
        assert label01(col(["1", bad])) is None
    good = ["4", "4.5", "0.5", "3.0", "05.50", "10"]
    assert decimal_column(col(good)).tolist() == [float(v) for v in good]
    for bad in ["4.", ".5", "4.5.1", "-4", "+4", "4e0", "nan", "inf", " 4", "4_5", None, "٣"]:
        assert RATING_RE.fullmatch(bad or "") is None
        assert decimal_column(col(["4", bad])) is None


def test_hex_text_matches_format():
    vals = np.array([0, 1, 0x68FD1E64, 0xFFFFFFFF], np.uint64)
    assert hex_text(vals) == [f"{int(v):08x}" for v in vals]
    big = np.array([1, 1 << 40], np.uint64)
    assert hex_text(big) == ["00000001", "10000000000"]


@pytest.mark.parametrize("n_keys, spread", [(0, 32), (1, 32), (7, 4), (5000, 32), (3000, 64), (2000, 12)])
def test_vocab_lookup_equals_searchsorted(n_keys, spread):
    from data.convert.criteo_vec import VocabKeys
    rng = np.random.default_rng(n_keys)
    hi = (1 << spread) - 1
    keys = np.unique(rng.integers(0, hi, n_keys, dtype=np.uint64, endpoint=True))
    q = rng.integers(0, hi, 4000, dtype=np.uint64, endpoint=True)
    if len(keys):
        q[::2] = keys[rng.integers(0, len(keys), 2000)]
    missing = rng.random(4000) < 0.1
    voc = VocabKeys(keys, *VocabKeys.index(keys))
    pos = np.searchsorted(keys, q)
    hit = (pos < len(keys)) & (keys[np.minimum(pos, max(len(keys) - 1, 0))] == q) if len(keys) else pos < 0
    want = np.where(missing, len(keys), np.where(hit, pos, len(keys) + 1))
    assert np.array_equal(voc.ids(q, missing), want)
