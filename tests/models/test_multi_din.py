"""Multi-embedding (models/multi.py) and DIN/DARE (models/din.py): the formulas, K = 1 against the
single-embedding models, and what decoupling changes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import models
from models.config import ModelConfig
from models.din import target_attention
from models.fm import fm_interaction
from models.layout import table_layout

B = 6
FEATS = {"a": 16, "b": 16, "c": 8}


def _cfg(name, k=1, **kw):
    return ModelConfig(name=name, mlp=[16, 8], dense_arch=[8], dropout=0.0, batch_norm=False, dcn_layers=2,
                       dcn_low_rank=4, num_embeddings=k, **kw)


def _tables(cfg, dims=FEATS, sizes=None, history_len=0):
    lay = table_layout(cfg, list(dims), dims, history_len)
    sizes = sizes or {}
    return lay, [EmbeddingBagConfig(name=t.name, embedding_dim=t.width, feature_names=list(t.features),
                                    num_embeddings=sizes.get(t.base, 20)) for t in lay.tables]


def _kjt(keys, batch=B, n=20, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    ln = lengths if lengths is not None else torch.randint(1, 3, (len(keys) * batch,), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.randint(0, n, (int(ln.sum()),), generator=g),
                                               lengths=ln)


def _expand(kjt, lay):
    from trainer.tables import derive_kjt

    return derive_kjt(kjt, lay.derived, lay.batch_keys)


def _build(cfg, tables, lay, num_dense=0):
    m = models.build_model(cfg, tables, num_dense, feature_names=list(lay.head_features), device="cpu").eval()
    for bag in m.ebc.embedding_bags.values():
        nn.init.normal_(bag.weight, std=0.5)
    return m


@pytest.mark.parametrize("name", ["deepfm", "dlrm", "dlrm_dcn"])
def test_multi_embedding_is_the_mean_of_per_set_hidden_layers(name):
    cfg = _cfg(name, k=2)
    lay, tables = _tables(cfg)
    m = _build(cfg, tables, lay, num_dense=3)
    assert type(m).__name__.startswith("Multi") and m.num_sets == 2
    kjt = _expand(_kjt(list(FEATS)), lay)
    dense = torch.randn(B, 3)
    kt = m.embed(kjt)
    by = kt.to_dict()
    hidden = []
    for k, feats in enumerate([list(FEATS), [f + "__me1" for f in FEATS]]):
        xs = [by[f] for f in feats]
        if name == "deepfm":
            d = m.factor_dims[k]
            v = m.projectors[k]([x[:, :dd] for x, dd in zip(xs, d)])
            hidden.append(m.blocks[k](torch.cat([v.flatten(1), dense], 1)))
        else:
            hidden.append(m.blocks[k](m.interactions[k](m.dense_arch(dense), m.projectors[k](xs))))
    expect = m.post((hidden[0] + hidden[1]) / 2).reshape(B)
    if name == "deepfm":
        first = sum(by[f][:, -1] for f in FEATS) + m.bias.value + m.dense_linear(dense).squeeze(-1)
        fm = [fm_interaction(m.projectors[k]([by[f + s][:, :d] for f, d in zip(FEATS, m.factor_dims[k])]))
              for k, s in enumerate(["", "__me1"])]
        expect = expect + first + (fm[0] + fm[1]) / 2
    torch.testing.assert_close(m(dense, kjt), expect)
    # every set reaches the logit through its own parameters: each set's table gets a gradient
    m.train()
    m(dense, kjt).sum().backward()
    for t in tables:
        assert m.ebc.embedding_bags[t.name].weight.grad.abs().sum() > 0, t.name


def test_deepfm_fm_term_of_the_sets_equals_one_wide_table():
    """sum_k FM(e^k) = FM([e^1 .. e^K]): the FM part alone cannot tell K sets from one table (why the
    per-set hidden layers matter)."""
    g = torch.Generator().manual_seed(1)
    sets = [torch.randn(B, 3, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    torch.testing.assert_close(sum(fm_interaction(v) for v in sets), fm_interaction(torch.cat(sets, dim=2)))


def _copy(dst, src, mapping):
    sd = src.state_dict()
    with torch.no_grad():
        for dname, p in dst.state_dict().items():
            sname = mapping(dname)
            if sname is not None:
                p.copy_(sd[sname])


def _se_name(name, dname):
    """Parameter name of the single-embedding model holding what ``dname`` holds in its K = 1 twin."""
    if dname.startswith("ebc.") or dname.startswith(("bias.", "dense_linear.", "dense_arch.")):
        return dname
    if dname.startswith("projectors.0."):
        return "project." + dname[len("projectors.0."):]
    if name == "deepfm":   # blocks.0 = mlp.layers[0:2] (Linear, ReLU...), post.layers[i] = mlp.layers[i + 3]
        if dname.startswith("blocks.0."):
            return "mlp.layers." + dname[len("blocks.0."):]
        i, rest = dname[len("post.layers."):].split(".", 1)
        return f"mlp.layers.{int(i) + 3}.{rest}"
    if dname.startswith("interactions.0."):
        return "inter_arch." + dname[len("interactions.0."):]
    if dname.startswith("blocks.0.0."):
        return "over_arch.model.0._mlp.0._linear." + dname.rsplit(".", 1)[1]
    if dname.startswith("post.model.0._mlp."):
        i, rest = dname[len("post.model.0._mlp."):].split(".", 1)
        return f"over_arch.model.0._mlp.{int(i) + 1}.{rest}"
    if dname.startswith("post.model.1."):
        return "over_arch.model.1." + dname.rsplit(".", 1)[1]
    raise KeyError(dname)


@pytest.mark.parametrize("name", ["deepfm", "dlrm", "dlrm_dcn"])
def test_k1_multi_class_is_the_single_embedding_model(name):
    from models.multi import MultiDeepFM, MultiDLRM, MultiDLRMDCN

    cfg = _cfg(name)
    lay, tables = _tables(cfg)
    se = _build(cfg, tables, lay, num_dense=3)
    cls = {"deepfm": MultiDeepFM, "dlrm": MultiDLRM, "dlrm_dcn": MultiDLRMDCN}[name]
    me = cls(cfg, models.build_model(cfg, tables, 3, device="cpu").ebc, se.fields, 3).eval()
    _copy(me, se, lambda d: _se_name(name, d))
    kjt = _kjt(list(FEATS), seed=4)
    dense = torch.randn(B, 3)
    torch.testing.assert_close(me(dense, kjt), se(dense, kjt))
    assert sum(p.numel() for p in me.parameters()) == sum(p.numel() for p in se.parameters())


def test_build_model_refuses_multi_embedding_for_other_models():
    with pytest.raises(ValueError, match="num_embeddings"):
        _cfg("autoint", k=2).validate("model")
    with pytest.raises(ValueError, match="hidden layer"):
        ModelConfig(name="dlrm", num_embeddings=2, mlp=[]).validate("model")


# ------------------------------------------------------------------------------ DIN / DARE
def _ref_attention(at, ah, rh, present):
    """float64 loops: masked softmax of scaled dot products, weighted sum; empty rows -> 0."""
    b, n, _ = ah.shape
    u = np.zeros((b, rh.shape[2]))
    for i in range(b):
        idx = [j for j in range(n) if present[i, j]]
        if not idx:
            continue
        s = np.array([at[i] @ ah[i, j] / math.sqrt(at.shape[1]) for j in idx])
        w = np.exp(s - s.max())
        w /= w.sum()
        u[i] = sum(wj * rh[i, j] for wj, j in zip(w, idx))
    return u


def test_target_attention_matches_the_formula():
    g = torch.Generator().manual_seed(2)
    at, ah, rh = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 4), (5, 3, 4), (5, 3, 6)))
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    u, w = target_attention(at, ah, rh, present)
    np.testing.assert_allclose(u.numpy(), _ref_attention(at.numpy(), ah.numpy(), rh.numpy(), present.numpy()),
                               rtol=1e-12, atol=1e-12)
    assert float(w[2].abs().sum()) == 0.0 and torch.all(w[~present] == 0)


DIN_DIMS = {"user_id": 8, "movie_id": 8, "history": 8}


def _din(attention, seed=0, history_len=3):
    cfg = _cfg("din", attention_embedding=attention)
    lay, tables = _tables(cfg, DIN_DIMS, history_len=history_len)
    m = _build(cfg, tables, lay)
    lengths = torch.tensor([1] * B + [1] * B + [3, 0, 2, 5, 1, 3])   # user_id, movie_id, history bag lengths
    raw = _kjt(["user_id", "movie_id", "history"], lengths=lengths, seed=seed)
    return m, lay, _expand(raw, lay), raw


def test_history_positions_are_the_bag_in_order():
    _, lay, kjt, raw = _din("shared")
    hist = raw["history"].to_dense()
    for i in range(3):
        jt = kjt[f"history__p{i}"]
        assert jt.lengths().tolist() == [int(len(h) > i) for h in hist]
        assert jt.values().tolist() == [int(h[i]) for h in hist if len(h) > i]
    assert "history" not in kjt.keys()


@pytest.mark.parametrize("attention", ["shared", "decoupled"])
def test_din_forward_uses_attention_and_masks_empty_positions(attention):
    m, _, kjt, raw = _din(attention)
    kt = m.embed(kjt)
    at, ah, rh, present = m.attention_inputs(kt)
    assert present.tolist() == [[len(h) > i for i in range(3)] for h in raw["history"].to_dense()]
    u, _ = target_attention(at, ah, rh, present)
    assert float(u[1].abs().sum()) == 0.0        # the example with no history
    logits = m(torch.zeros(B, 0), kjt)
    assert logits.shape == (B,) and torch.isfinite(logits).all()


def test_decoupled_attention_weights_do_not_depend_on_the_representation_table():
    for attention, moves in (("decoupled", False), ("shared", True)):
        m, _, kjt, _ = _din(attention)
        _, w0 = target_attention(*m.attention_inputs(m.embed(kjt)))
        with torch.no_grad():
            m.ebc.embedding_bags["movie_id"].weight.mul_(3.0).add_(0.1)
        _, w1 = target_attention(*m.attention_inputs(m.embed(kjt)))
        assert (not torch.allclose(w0, w1)) == moves, attention


def test_decoupled_gradients_split_between_the_tables():
    """The attention scores' gradient reaches only the attention table; the aggregation's only R."""
    m, _, kjt, _ = _din("decoupled")
    _, w = target_attention(*m.attention_inputs(m.embed(kjt)))
    (w * torch.arange(3.0)).sum().backward()   # (the weights of a row sum to 1: weight the positions)
    assert m.ebc.embedding_bags["movie_id__att"].weight.grad.abs().sum() > 0
    assert m.ebc.embedding_bags["movie_id"].weight.grad is None or \
        float(m.ebc.embedding_bags["movie_id"].weight.grad.abs().sum()) == 0.0


# ------------------------------------------------------------------------------ generic checks (as test_models.py)
def _generic(kind):
    if kind == "din":
        cfg = _cfg("din")
        lay, tables = _tables(cfg, DIN_DIMS, history_len=3)
        lengths = torch.tensor([1] * B + [1] * B + [3, 0, 2, 5, 1, 3])
        kjt = _expand(_kjt(["user_id", "movie_id", "history"], lengths=lengths), lay)
    else:
        cfg = _cfg(kind, k=2)
        lay, tables = _tables(cfg)
        kjt = _expand(_kjt(list(FEATS)), lay)
    return cfg, lay, tables, kjt


GENERIC = ["deepfm", "dlrm", "dlrm_dcn", "din"]


@pytest.mark.parametrize("kind", GENERIC)
def test_builds_on_meta_and_every_parameter_owner_can_reset(kind):
    cfg, lay, tables, _ = _generic(kind)
    model = models.build_model(cfg, tables, 3, feature_names=list(lay.head_features), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta or n.endswith("triu_indices") for n, b in model.named_buffers())
    for name, mod in model.named_modules():
        if not name.startswith("ebc") and list(mod.parameters(recurse=False)):
            assert hasattr(mod, "reset_parameters"), f"{name} ({type(mod).__name__}) cannot be re-initialised"


@pytest.mark.parametrize("kind", GENERIC)
def test_gradients_reach_every_table_and_dense_features_matter(kind):
    cfg, lay, tables, kjt = _generic(kind)
    model = _build(cfg, tables, lay, num_dense=2)
    dense = torch.randn(B, 2)
    model(dense, kjt).sum().backward()
    for t in tables:
        g = model.ebc.embedding_bags[t.name].weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, t.name
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("ebc."))
    model.eval()
    assert not torch.allclose(model(torch.zeros(B, 2), kjt), model(torch.ones(B, 2), kjt))
