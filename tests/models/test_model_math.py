"""Model maths against independent float64 brute-force computations on tiny examples."""
from __future__ import annotations

import itertools

import torch
from torch import nn

import models
from models.autoint import SelfAttention

B = 5


def _pooled(model, kjt) -> dict[str, torch.Tensor]:
    """SUM-pooled rows per feature, computed by hand from the table weights (float64)."""
    out = {}
    by_table = {f: t for t, cfg in zip(model.ebc.embedding_bags, model.ebc.embedding_bag_configs())
                for f in cfg.feature_names}
    for f, jt in kjt.to_dict().items():
        w = model.ebc.embedding_bags[by_table[f]].weight.detach().double()
        out[f] = torch.stack([w[ids].sum(0) for ids in jt.to_dense()])
    return out


def _build(mk, name, dims, num_dense=0):
    tables = mk.tables(name, dims)
    model = models.build_model(mk.cfg(name), tables, num_dense, device="cpu").eval()
    for bag in model.ebc.embedding_bags.values():
        nn.init.normal_(bag.weight)  # larger than the default init, so every term matters
    return model


def _fm_brute_force(factors: list[torch.Tensor], first: torch.Tensor, bias: float) -> torch.Tensor:
    second = sum((factors[i] * factors[j]).sum(1) for i, j in itertools.combinations(range(len(factors)), 2))
    return first + second + bias


def test_fm_matches_pairwise_brute_force(mk):
    dims = {"a": 3, "b": 3, "c": 3}
    model = _build(mk, "fm", dims)
    model.bias.value.data.fill_(0.3)
    kjt = mk.kjt(list(dims), B, num_embeddings=20)
    pooled = _pooled(model, kjt)
    factors = [pooled[f][:, :3] for f in dims]
    first = sum(pooled[f][:, -1] for f in dims)  # the last column = first-order weight
    expected = _fm_brute_force(factors, first, 0.3)
    torch.testing.assert_close(model(torch.zeros(B, 0), kjt).double(), expected, rtol=1e-5, atol=1e-5)


def test_fm_linear_term_is_sum_of_last_columns(mk):
    dims = {"a": 4, "b": 4}
    model = _build(mk, "fm", dims)
    kjt = mk.kjt(list(dims), B)
    _, first = model.factors_and_first_order(model.embed(kjt))
    pooled = _pooled(model, kjt)
    torch.testing.assert_close(first.double(), pooled["a"][:, -1] + pooled["b"][:, -1])


def test_fm_ignores_padding_columns(mk):
    dims = {"a": 4, "b": 4}
    model = _build(mk, "fm", dims)
    kjt = mk.kjt(list(dims), B)
    before = model(torch.zeros(B, 0), kjt)
    for bag in model.ebc.embedding_bags.values():
        bag.weight.data[:, 4:-1] = 123.0
    torch.testing.assert_close(model(torch.zeros(B, 0), kjt), before)


def test_fm_with_projection_and_dense(mk):
    dims = {"a": 2, "b": 4}
    model = _build(mk, "fm", dims, num_dense=2)
    kjt, dense = mk.kjt(list(dims), B), torch.randn(B, 2)
    pooled = _pooled(model, kjt)
    w_proj = model.project.proj["0"].weight.detach().double()  # a: 2 -> 4
    factors = [pooled["a"][:, :2] @ w_proj.T, pooled["b"][:, :4]]
    first = pooled["a"][:, -1] + pooled["b"][:, -1]
    dense_term = dense.double() @ model.dense_linear.weight.detach().double().T
    expected = _fm_brute_force(factors, first + dense_term.squeeze(1), model.bias.value.item())
    torch.testing.assert_close(model(dense, kjt).double(), expected, rtol=1e-5, atol=1e-5)


def test_deepfm_is_fm_plus_mlp(mk):
    dims = {"a": 4, "b": 4, "c": 4}
    model = _build(mk, "deepfm", dims, num_dense=2)
    kjt, dense = mk.kjt(list(dims), B), torch.randn(B, 2)
    pooled = _pooled(model, kjt)
    factors = [pooled[f][:, :4] for f in dims]
    first = sum(pooled[f][:, -1] for f in dims)
    dense_term = (dense.double() @ model.dense_linear.weight.detach().double().T).squeeze(1)
    fm_part = _fm_brute_force(factors, first + dense_term, model.bias.value.item())
    mlp_in = torch.cat(factors + [dense.double()], dim=1).float()
    expected = fm_part + model.mlp(mlp_in).double()
    torch.testing.assert_close(model(dense, kjt).double(), expected, rtol=1e-5, atol=1e-5)


def test_self_attention_matches_torch_multihead():
    attn = SelfAttention(8, 2, 0.0).eval()
    ref = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.in_proj.weight)
        ref.in_proj_bias.copy_(attn.in_proj.bias)
        ref.out_proj.weight.copy_(attn.out_proj.weight)
        ref.out_proj.bias.copy_(attn.out_proj.bias)
    x = torch.randn(B, 3, 8)
    torch.testing.assert_close(attn(x), ref(x, x, x, need_weights=False)[0])


def test_autoint_residual_path(mk):
    """With every attention output zeroed, the attention part is attn_fc(ReLU(W_res v))."""
    dims = {"a": 8, "b": 8, "c": 8}
    model = _build(mk, "autoint", dims)
    kjt = mk.kjt(list(dims), B)
    with_attention = model(torch.zeros(B, 0), kjt)
    for layer in model.self_attns:
        nn.init.zeros_(layer.out_proj.weight)
        nn.init.zeros_(layer.out_proj.bias)
    pooled = _pooled(model, kjt)
    v = torch.stack([pooled[f] for f in dims], dim=1).float()
    res = torch.relu(v @ model.res_embedding.weight.T + model.res_embedding.bias)
    expected = model.attn_fc(res.flatten(1)).squeeze(-1) + model.dnn(v.flatten(1))
    got = model(torch.zeros(B, 0), kjt)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, with_attention)  # the attention layers did contribute before


def test_dlrm_interaction_without_dense(mk):
    """num_dense=0: the dense vector is one learned constant c; over-arch input is
    [c, <c, s_f> for f, <s_i, s_j> for i < j] (TorchRec's triu order)."""
    dims = {"a": 4, "b": 4, "c": 4}
    model = _build(mk, "dlrm", dims)
    seen = {}
    model.over_arch.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    kjt = mk.kjt(list(dims), B)
    model(torch.zeros(B, 0), kjt)
    pooled = _pooled(model, kjt)
    c = model.dense_arch.value.detach().double().expand(B, -1)
    vecs = [c] + [pooled[f] for f in dims]
    dots = [(vecs[i] * vecs[j]).sum(1, keepdim=True) for i, j in itertools.combinations(range(4), 2)]
    expected = torch.cat([c] + dots, dim=1)
    torch.testing.assert_close(seen["x"].double(), expected, rtol=1e-5, atol=1e-5)


def test_dlrm_dense_arch_ends_at_embedding_dim(mk):
    model = _build(mk, "dlrm", {"a": 8, "b": 4}, num_dense=3)
    linears = [m for m in model.dense_arch.modules() if isinstance(m, nn.Linear)]
    # cfg.dense_arch = [8] already ends at the common dim (8): used as is.
    assert [lin.out_features for lin in linears] == [8]
    model = _build(mk, "dlrm_dcn", {"a": 12, "b": 4}, num_dense=3)
    linears = [m for m in model.dense_arch.modules() if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [8, 12]  # 12 appended
