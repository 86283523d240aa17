"""``tailrec evaluate --checkpoint DIR``: load a DCP checkpoint (any world size) and evaluate a split."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.config import load_config
from trainer.config_base import ConfigError


def _run_config(checkpoint: Path, config: str | None, overrides: list[str]):
    if config:
        return load_config(config, overrides)
    saved = checkpoint.parent.parent / "config.yaml"   # <run_dir>/checkpoints/step_N -> <run_dir>/config.yaml
    if not saved.exists():
        raise ConfigError(f"{checkpoint}: no --config given and no saved {saved}")
    return load_config(str(saved), overrides)


def run_evaluate(checkpoint: str, split: str, config: str | None, overrides: list[str],
                 predictions: str | None = None) -> int:
    from trainer.dist import init_distributed, shutdown
    from trainer.loop import Trainer

    ck = Path(checkpoint)
    if not (ck / "COMPLETE").exists():
        raise ConfigError(f"{ck}: not a complete tailrec checkpoint (no COMPLETE marker)")
    cfg = _run_config(ck, config, overrides)
    env = init_distributed(cfg.train.device)
    try:
        trainer = Trainer(cfg, env)
        trainer.load_checkpoint(ck)
        res = trainer.evaluate_split(split)
        out = {"checkpoint": str(ck), "split": split, "step": trainer.state.step, "metrics": res}
        if predictions:
            from trainer import predictions as preds

            table = preds.collect(trainer.dmp, trainer.loaders[split], env.device)
            written = preds.write(table, predictions, env.rank, env.world_size)
            out["predictions"] = str(written if env.world_size == 1 else Path(predictions))
        if env.is_main:
            print(json.dumps(out, indent=2, default=float))
        return 0
    finally:
        shutdown()
