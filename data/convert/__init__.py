"""Raw -> Parquet conversion (``tailrec convert``).

Entry points; the format-specific code is in ``movielens.py`` / ``criteo.py``, what they share
(options, split, vocabularies, manifest) in ``common.py``::

    convert_movielens(src_dir, out_dir, opts: MovieLensOptions | None = None) -> Manifest
    convert_criteo(src_files, out_dir, opts: CriteoOptions | None = None) -> Manifest
"""
from __future__ import annotations

from pathlib import Path

from data.convert.common import (CommonOptions, CriteoOptions, MovieLensOptions, OptionsError, Vocab,
                                 options_from, row_uniform, split_of)
from data.manifest import Manifest


def convert_movielens(src_dir, out_dir, opts: MovieLensOptions | None = None) -> Manifest:
    from data.convert.movielens import convert

    return convert(Path(src_dir), Path(out_dir), opts or MovieLensOptions())


def convert_criteo(src_files, out_dir, opts: CriteoOptions | None = None) -> Manifest:
    from data.convert.criteo import convert, resolve_inputs

    return convert(resolve_inputs(src_files), Path(out_dir), opts or CriteoOptions())


__all__ = ["convert_movielens", "convert_criteo", "CommonOptions", "MovieLensOptions", "CriteoOptions",
           "OptionsError", "Vocab", "options_from", "row_uniform", "split_of"]
