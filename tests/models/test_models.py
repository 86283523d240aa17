"""Every model: forward values, gradients, shadow features, per-table dims, num_dense=0, meta build."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from trainer.config import ModelConfig

# din needs a history and a target feature in its tables (models/layout.py): the same generic checks
# for it, and for the multi-embedding classes, are in test_multi_din.py
NAMES = sorted(n for n in models.MODEL_CLASSES if n != "din")
B = 6


def _build(mk, name, dims, num_dense, shadow=(), device="cpu"):
    tables = mk.tables(name, dims, shadow=shadow)
    return models.build_model(mk.cfg(name), tables, num_dense, feature_names=list(dims), device=device)


@pytest.mark.parametrize("num_dense", [0, 3])
@pytest.mark.parametrize("name", NAMES)
def test_forward_finite_logits(mk, name, num_dense):
    model = _build(mk, name, {"a": 8, "b": 8, "c": 8}, num_dense)
    kjt = mk.kjt(["a", "b", "c"], B)
    dense = torch.randn(B, num_dense)
    for mode in (model.train, model.eval):
        mode()
        logits = model(dense, kjt)
        assert logits.shape == (B,)
        assert torch.isfinite(logits).all()
    # Examples differ, so the logits must too (catches a head that ignores its input).
    assert logits.std() > 0


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_head_of_embed(mk, name):
    model = _build(mk, name, {"a": 8, "b": 8}, 2).eval()
    kjt, dense = mk.kjt(["a", "b"], B), torch.randn(B, 2)
    torch.testing.assert_close(model(dense, kjt), model.head(dense, model.embed(kjt)))


@pytest.mark.parametrize("name", NAMES)
def test_dense_features_change_logits(mk, name):
    model = _build(mk, name, {"a": 8, "b": 8}, 3).eval()
    kjt = mk.kjt(["a", "b"], B)
    assert not torch.allclose(model(torch.zeros(B, 3), kjt), model(torch.ones(B, 3), kjt))


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_table(mk, name):
    model = _build(mk, name, {"a": 8, "b": 4, "c": 12}, 2)
    kjt = mk.kjt(["a", "b", "c"], B)
    model(torch.randn(B, 2), kjt).sum().backward()
    extra = models.extra_dims(name)
    for tname, bag in model.ebc.embedding_bags.items():
        grad = bag.weight.grad
        assert grad is not None and torch.isfinite(grad).all(), tname
        dim = bag.weight.shape[1] - extra
        assert grad[:, :dim].abs().sum() > 0, f"{tname}: no gradient on the factor columns"
        if extra:
            assert grad[:, -1].abs().sum() > 0, f"{tname}: no gradient on the first-order column"
            assert grad[:, dim:-1].abs().sum() == 0, f"{tname}: padding columns must be unused"
    dense_params = [p for n, p in model.named_parameters() if not n.startswith("ebc.")]
    assert all(p.grad is not None for p in dense_params)


@pytest.mark.parametrize("name", NAMES)
def test_shadow_features_do_not_change_logits(mk, name):
    model = _build(mk, name, {"a": 8, "b": 8}, 0, shadow=("a",)).eval()
    keys = ["a", "a__shadow", "b"]
    kjt1 = mk.kjt(keys, B, seed=1)
    # Same a and b bags, different shadow ids (and shadow bag lengths).
    d1, d2 = kjt1.to_dict(), mk.kjt(keys, B, seed=2).to_dict()
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt2 = KeyedJaggedTensor.from_jt_dict({"a": d1["a"], "a__shadow": d2["a__shadow"], "b": d1["b"]})
    assert not torch.equal(model.embed(kjt1)["a__shadow"], model.embed(kjt2)["a__shadow"])
    torch.testing.assert_close(model(torch.zeros(B, 0), kjt1), model(torch.zeros(B, 0), kjt2))


@pytest.mark.parametrize("name", NAMES)
def test_per_table_dims_project_to_max(mk, name):
    model = _build(mk, name, {"a": 4, "b": 8, "c": 12}, 0)
    proj = model.project
    assert proj.common_dim == 12
    # Only the narrower fields are projected, without bias.
    assert sorted(proj.proj) == ["0", "1"]
    assert all(lin.bias is None for lin in proj.proj.values())
    logits = model(torch.zeros(B, 0), mk.kjt(["a", "b", "c"], B))
    assert logits.shape == (B,) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_equal_dims_have_no_projection(mk, name):
    model = _build(mk, name, {"a": 8, "b": 8}, 0)
    assert len(model.project.proj) == 0


def test_feature_names_default_and_order(mk):
    tables = mk.tables("dlrm", {"a": 8, "b": 8}, shadow=("a",))
    model = models.build_model(mk.cfg("dlrm"), tables, 0, device="cpu")
    assert model.feature_names == ["a", "a__shadow", "b"]
    model = models.build_model(mk.cfg("dlrm"), tables, 0, ["b", "a"], device="cpu")
    assert model.feature_names == ["b", "a"]


@pytest.mark.parametrize("name", NAMES)
def test_builds_on_meta_without_materialising(mk, name):
    model = _build(mk, name, {"a": 8, "b": 4}, 3, device="meta")
    assert all(p.is_meta for p in model.parameters())
    # Only DLRM's non-persistent triu_indices buffer lives on CPU (see models/dlrm.py).
    real = [n for n, b in model.named_buffers() if not b.is_meta]
    assert real in ([], ["inter_arch.triu_indices"])


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_owner_can_reset(mk, name):
    """DMP materialises meta modules with empty memory + ``reset_parameters`` on the direct owner."""
    model = _build(mk, name, {"a": 8, "b": 4}, 3, device="meta")
    for mod_name, mod in model.named_modules():
        if mod_name.startswith("ebc") or not list(mod.parameters(recurse=False)):
            continue
        assert hasattr(mod, "reset_parameters"), f"{mod_name} ({type(mod).__name__}) cannot be re-initialised"


def test_reset_parameters_restores_crossnet_init(mk):
    model = _build(mk, "dlrm_dcn", {"a": 8, "b": 8}, 0)
    cross = model.inter_arch.crossnet
    for plist in (cross.W_kernels, cross.V_kernels, cross.bias):
        for p in plist:
            p.data.fill_(float("nan"))
        plist.reset_parameters()
    assert all(torch.isfinite(p).all() for p in cross.parameters())
    assert all(p.abs().sum() == 0 for p in cross.bias)


def test_rejects_bad_input(mk):
    tables = mk.tables("dlrm", {"a": 8})
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model(ModelConfig(name="widedeep"), tables, 0)
    with pytest.raises(ValueError, match="unknown model"):
        models.extra_dims("widedeep")
    with pytest.raises(ValueError, match="not features"):
        models.build_model(mk.cfg("dlrm"), tables, 0, ["a", "zzz"])
    # FM tables built without the extra columns are caught.
    with pytest.raises(ValueError, match="extra_dims"):
        models.build_model(mk.cfg("fm"), mk.tables("dlrm", {"a": 4}), 0)
    with pytest.raises(ValueError, match="divisible"):
        models.build_model(ModelConfig(name="autoint", attn_dim=7, attn_heads=2), tables, 0)


def test_extra_dims():
    assert {n: models.extra_dims(n) for n in NAMES} == {
        "autoint": 0, "deepfm": 4, "dlrm": 0, "dlrm_dcn": 0, "fm": 4}
    # The resulting FM width stays a multiple of 4 for usual dims (FBGEMM fused kernels need it).
    assert all((d + models.extra_dims("fm")) % 4 == 0 for d in (16, 24, 32))


def test_mlp_layer_order(mk):
    model = _build(mk, "deepfm", {"a": 8, "b": 8}, 0)
    kinds = [type(m) for m in model.mlp.layers]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    cfg = ModelConfig(name="deepfm", mlp=[5], batch_norm=False)
    no_bn = models.build_model(cfg, mk.tables("deepfm", {"a": 8}), 0, device="cpu")
    assert [type(m) for m in no_bn.mlp.layers] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
