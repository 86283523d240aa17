"""models/layout.py: which tables and derived keys each model option asks for."""
from __future__ import annotations

import pytest

from models import fm
from models.config import ModelConfig
from models.layout import EXTRA_COLS, base_feature, set_index, table_layout

DIMS = {"user_id": 16, "movie_id": 16, "genres": 8}


def test_extra_cols_is_the_fm_models_constant():
    assert EXTRA_COLS == fm.EXTRA_COLS


def test_single_embedding_is_one_table_per_feature():
    lay = table_layout(ModelConfig(name="deepfm"), list(DIMS), DIMS)
    assert [(t.name, t.features, t.factor_dim, t.width) for t in lay.tables] == [
        ("user_id", ("user_id",), 16, 20), ("movie_id", ("movie_id",), 16, 20), ("genres", ("genres",), 8, 12)]
    assert lay.derived == () and lay.head_features == tuple(DIMS)


@pytest.mark.parametrize("name,first", [("deepfm", 4), ("dlrm", 0), ("dlrm_dcn", 0)])
def test_multi_embedding_splits_each_feature_into_k_tables(name, first):
    lay = table_layout(ModelConfig(name=name, num_embeddings=2), list(DIMS), DIMS)
    by = {t.name: t for t in lay.tables}
    assert set(by) == {"user_id", "user_id__me1", "movie_id", "movie_id__me1", "genres", "genres__me1"}
    assert by["movie_id"].width == 8 + first and by["movie_id__me1"].width == 8   # first-order column: set 0 only
    assert by["genres__me1"].factor_dim == 4 and by["genres__me1"].base == "genres"
    assert sum(t.factor_dim for t in lay.tables) == sum(DIMS.values())          # same total size as K = 1
    assert {(d.key, d.source, d.position) for d in lay.derived} == {
        ("user_id__me1", "user_id", -1), ("movie_id__me1", "movie_id", -1), ("genres__me1", "genres", -1)}
    assert [set_index(t.name) for t in lay.tables] == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("k,dims,msg", [(3, DIMS, "not divisible"), (4, DIMS, "multiple of 4"),
                                        (2, {"a": 12}, "multiple of 4")])
def test_multi_embedding_dims_are_checked(k, dims, msg):
    with pytest.raises(ValueError, match=msg):
        table_layout(ModelConfig(name="dlrm", num_embeddings=k), list(dims), dims)


def test_din_shared_and_decoupled():
    feats = ["user_id", "movie_id", "history", "genres"]
    dims = {"user_id": 16, "movie_id": 16, "history": 16, "genres": 8}
    shared = table_layout(ModelConfig(name="din", attention_embedding="shared"), feats, dims, history_len=3)
    assert [t.name for t in shared.tables] == ["user_id", "movie_id", "genres"]   # no table for the raw history
    assert shared.table("movie_id").features == ("movie_id", "history__p0", "history__p1", "history__p2")
    assert [(d.key, d.source, d.position) for d in shared.derived] == [
        ("history__p0", "history", 0), ("history__p1", "history", 1), ("history__p2", "history", 2)]
    assert shared.head_features == ("user_id", "movie_id", "genres")
    assert "history" not in shared.batch_keys
    dec = table_layout(ModelConfig(name="din", attention_dim=8), feats, dims, history_len=2)
    att = dec.table("movie_id__att")
    assert att.features == ("movie_id__att", "history__att_p0", "history__att_p1") and att.width == 8
    assert att.base == "movie_id" and base_feature(att.name) == "movie_id" and set_index(att.name) == -1
    assert ("movie_id__att", "movie_id", -1) in {(d.key, d.source, d.position) for d in dec.derived}


def test_din_needs_its_features_and_a_history():
    cfg = ModelConfig(name="din")
    with pytest.raises(ValueError, match="history_feature"):
        table_layout(cfg, ["movie_id"], {"movie_id": 8}, 3)
    with pytest.raises(ValueError, match="history length"):
        table_layout(cfg, ["movie_id", "history"], {"movie_id": 8, "history": 8}, 0)


def test_feature_names_with_the_separator_are_refused():
    with pytest.raises(ValueError, match="contains '__'"):
        table_layout(ModelConfig(), ["a__b"], {"a__b": 8})
