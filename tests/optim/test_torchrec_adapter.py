"""Fails loudly when a TorchRec upgrade breaks the one hook tailrec relies on."""
import inspect

import torchrec
from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag, EmbeddingFusedOptimizer
from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup

from trainer.optim import torchrec_adapter as ta
from trainer.optim.rules import RuleConfig


def test_torchrec_version_and_hooked_signature():
    assert torchrec.__version__.startswith(ta.TORCHREC_VERSION), torchrec.__version__
    params = tuple(inspect.signature(GroupedPooledEmbeddingsLookup._create_embedding_kernel).parameters)
    assert params == ("self", "config", "device", "pg", "sharding_type", "env"), params
    ta.check_torchrec_compat()


def test_base_classes_we_build_on_still_look_the_same():
    init = tuple(inspect.signature(BaseBatchedEmbeddingBag.__init__).parameters)
    assert init[:5] == ("self", "config", "pg", "device", "sharding_type"), init
    opt = tuple(inspect.signature(EmbeddingFusedOptimizer.__init__).parameters)
    assert opt[:4] == ("self", "config", "emb_module", "pg"), opt


def test_hook_is_scoped():
    orig = GroupedPooledEmbeddingsLookup._create_embedding_kernel
    with ta.tailrec_kernels():
        assert GroupedPooledEmbeddingsLookup._create_embedding_kernel is ta._create_embedding_kernel
    assert GroupedPooledEmbeddingsLookup._create_embedding_kernel is orig


def test_marker_is_hashable_and_keeps_fbgemm_type():
    kw = ta.optimizer_kwargs(RuleConfig(lr=0.3))
    hash(tuple(sorted(kw.items(), key=lambda x: x[0])))
    assert kw["lr"] == 0.3 and "optimizer" in kw
