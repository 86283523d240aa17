"""The fused embedding optimizer: pure rules (rules.py), our TorchRec kernel (kernel.py,
torchrec_adapter.py) and the FBGEMM baselines (fbgemm.py).

Trainer-facing runtime API (re-exported lazily so `import trainer.optim` stays light):
`set_main_loss(dmp, loss)`, `set_optimizer_step(dmp, step)`, `kernel_stats(dmp)`.
"""
from typing import Any

_LAZY = {"set_main_loss", "set_optimizer_step", "kernel_stats", "tailrec_kernels"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from trainer.optim import torchrec_adapter

        return getattr(torchrec_adapter, name)
    raise AttributeError(name)
