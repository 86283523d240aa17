"""Column checks and decoders on Arrow string arrays, in numpy over the raw buffers (no Python per value).

Every checker returns ``None`` when a value breaks the grammar of the row parsers (``data.readers.
parse_int``, ``data.convert.criteo.parse_line``); the caller then sends the whole block through the
row parser, which names the line and field. So these functions must never accept a value that the
row parser rejects; rejecting a good one only costs speed.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

_U = np.uint64
_HEXVAL = np.full(256, 255, np.uint8)            # ASCII hex digit -> value, anything else -> 255
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEXVAL[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEXVAL[_c] = 10 + _i
_ISHEX = _HEXVAL < 16
_INTCHAR = np.zeros(256, np.uint8)               # 1: digit, 2: '-', 0: anything else
_INTCHAR[list(b"0123456789")] = 1
_INTCHAR[ord("-")] = 2
_DECCHAR = _INTCHAR.copy()                       # 1: digit, 2: '.', 0: anything else
_DECCHAR[ord("-")] = 0
_DECCHAR[ord(".")] = 2


_ARROW_TYPES = {np.dtype(np.float32): pa.float32(), np.dtype(np.float64): pa.float64(), np.dtype(np.int64): pa.int64(),
                np.dtype(np.int32): pa.int32(), np.dtype(np.uint64): pa.uint64()}


def arrow(a: np.ndarray) -> pa.Array:
    """A numeric numpy array as an Arrow array without a copy. (``pa.array`` on numpy imports pandas,
    about a second of start-up in every worker process.)"""
    a = np.ascontiguousarray(a)
    return pa.Array.from_buffers(_ARROW_TYPES[a.dtype], len(a), [None, pa.py_buffer(a)])


def numpy_of(arr) -> np.ndarray:
    """A null-free numeric Arrow array as a numpy view of its buffer (``to_numpy`` imports pandas)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.chunk(0) if arr.num_chunks == 1 else pa.concat_arrays(arr.chunks)
    dtype = np.dtype(arr.type.to_pandas_dtype()) if not pa.types.is_floating(arr.type) else \
        np.dtype(np.float32 if arr.type == pa.float32() else np.float64)
    return np.frombuffer(arr.buffers()[1], dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def string_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(offsets int32 [n+1] starting at 0, lengths [n], bytes)`` of a string array, views on its
    buffers where possible; a null value has length 0."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    n = len(arr)
    bufs = arr.buffers()
    off = np.frombuffer(bufs[1], np.int32, count=n + 1, offset=arr.offset * 4)
    start, end = int(off[0]), int(off[-1])
    data = np.frombuffer(bufs[2], np.uint8, count=end - start, offset=start) if end > start else np.zeros(0, np.uint8)
    if start:
        off = off - start
    return off, np.diff(off), data


def label01(arr: pa.Array) -> np.ndarray | None:
    """float32 labels from a column whose every value must be exactly ``0`` or ``1``."""
    off, ln, data = string_parts(arr)
    if len(ln) and (ln.min() != 1 or ln.max() != 1):
        return None
    d = data.astype(np.int16) - ord("0")
    if len(d) and (d.min() < 0 or d.max() > 1):
        return None
    return d.astype(np.float32)


def int_column(arr: pa.Array, allow_empty: bool = True) -> np.ndarray | None:
    """int64 values of decimal integers ``-?[0-9]+`` (``data.readers.parse_int``); empty -> 0, or
    None when ``allow_empty`` is off.

    Arrow's own int64 parser also takes ``" 5"`` and ``0x10``, so the bytes are checked here first;
    a value beyond int64 fails the cast."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    off, ln, data = string_parts(arr)
    empty = ln == 0
    if not allow_empty and empty.any():
        return None
    minus = np.flatnonzero((data - np.uint8(48)) > 9)     # not a digit (uint8 wraps below '0')
    if len(minus) and (data[minus] != ord("-")).any():
        return None
    if len(minus):                                # a '-' must open a value and be followed by a digit
        value = np.searchsorted(off, minus, side="right") - 1
        if (off[value] != minus).any() or (ln[value] < 2).any():
            return None
    try:
        ints = arr.cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    vals = np.frombuffer(ints.buffers()[1], np.int64, count=len(ints), offset=ints.offset * 8)
    if ints.null_count:
        vals = vals.copy()
        vals[empty] = 0                           # null slots hold undefined values
    return vals


def decimal_column(arr: pa.Array) -> np.ndarray | None:
    """float64 values of ``[0-9]+(.[0-9]+)?`` (no sign, exponent, spaces or empty value), parsed by
    Arrow as Python's ``float()`` does (both round correctly)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    off, ln, data = string_parts(arr)
    if len(ln) and ln.min() == 0:
        return None
    cls = _DECCHAR[data]
    if len(cls) and cls.min() == 0:
        return None
    dots = np.flatnonzero(cls == 2)
    if len(dots):                                 # one '.' at most, between digits
        value = np.searchsorted(off, dots, side="right") - 1
        if (dots == off[value]).any() or (dots == off[value + 1] - 1).any() or np.bincount(value).max() > 1:
            return None
    try:
        return numpy_of(arr.cast(pa.float64()))
    except pa.ArrowInvalid:
        return None


def _pack8(x: np.ndarray) -> np.ndarray:
    """8 ASCII hex digits per little-endian uint64 lane (first digit in the low byte) -> their value."""
    x = (x & _U(0x0F0F0F0F0F0F0F0F)) + ((x >> _U(6)) & _U(0x0101010101010101)) * _U(9)   # 'a'/'A' -> 10..
    m1, m2, m3 = _U(0x000F000F000F000F), _U(0x000000FF000000FF), _U(0xFFFF)
    x = ((x & m1) << _U(4)) | ((x >> _U(8)) & m1)
    x = ((x & m2) << _U(8)) | ((x >> _U(16)) & m2)
    return ((x & m3) << _U(16)) | ((x >> _U(32)) & m3)


def _hex_lanes_ok(x: np.ndarray) -> bool:
    """Every byte of the uint64 lanes is an ASCII hex digit (SWAR range checks, 8 bytes per op)."""
    hi = _U(0x8080808080808080)
    if (x & hi).any():                       # a byte >= 0x80: the range checks below assume ASCII
        return False
    ones = 0x0101010101010101
    low = x | _U(0x2020202020202020)         # 'A'-'F' -> 'a'-'f'; digits already have bit 5 set
    digit = (x + _U(ones * (0x80 - 0x30))) & ~(x + _U(ones * (0x80 - 0x3A)))
    alpha = (low + _U(ones * (0x80 - 0x61))) & ~(low + _U(ones * (0x80 - 0x67)))
    return bool((((digit | alpha) & hi) == hi).all())


def hex_column(arr: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """``(uint64 values, missing)`` of hex strings of 1-16 digits (either case); empty -> missing.

    All values of 8 digits (the real data) are checked and decoded 8 bytes per uint64 lane, without a
    gather; other lengths are right-aligned into 16 digits first."""
    off, ln, data = string_parts(arr)
    n = len(ln)
    missing = ln == 0
    if n == 0 or not len(data):
        return np.zeros(n, _U), missing
    present = n - int(np.count_nonzero(missing))
    if len(data) == 8 * present and ln.max() == 8:          # every non-empty value has 8 digits
        lanes = np.ascontiguousarray(data).view("<u8")
        if not _hex_lanes_ok(lanes):
            return None
        vals = _pack8(lanes)
        if present == n:
            return vals, missing
        out = np.zeros(n, _U)
        out[~missing] = vals
        return out, missing
    if not _ISHEX[data].all() or ln.max() > 16:
        return None
    pad = 16 - ln
    idx = off[:-1, None] + np.arange(16) - pad[:, None]
    digits = _HEXVAL[data[np.clip(idx, 0, len(data) - 1)]]
    digits[np.arange(16) < pad[:, None]] = 0
    packed = (digits[:, 0::2] << 4) | digits[:, 1::2]          # (n, 8) bytes, most significant first
    return np.ascontiguousarray(packed).view(">u8").ravel().astype(_U), missing


def hex_text(values: np.ndarray) -> list[str]:
    """``f"{v:08x}"`` of each value (vocabulary files), vectorised for values below 2**32."""
    values = np.asarray(values, _U)
    if len(values) == 0:
        return []
    if values.max() >= 1 << 32:
        return [f"{int(v):08x}" for v in values]
    shifts = np.arange(28, -4, -4, dtype=_U)
    digits = ((values[:, None] >> shifts) & _U(15)).astype(np.uint8)
    chars = np.frombuffer(b"0123456789abcdef", np.uint8)[digits]
    return np.ascontiguousarray(chars).view("S8").ravel().astype(str).tolist()
