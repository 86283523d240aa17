"""Typed config: YAML include + overrides, unknown keys and bad values rejected, every shipped config loads."""
from pathlib import Path

import pytest

from trainer.config import Config, load_config
from trainer.config_base import ConfigError, dump, load

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)


def test_include_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  name: fm\n  mlp: [8]\nembedding:\n  dim: 4\n")
    top = tmp_path / "top.yaml"
    top.write_text("include: base.yaml\nmodel:\n  mlp: [16, 8]\n")
    cfg = load_config(str(top), ["--embedding.dim=32", "--embedding.tables.movie_id.dim=8",
                                 "--embedding.tables.movie_id.optimizer.name=cfsgd", "--train.epochs=5"])
    assert cfg.model.name == "fm" and cfg.model.mlp == [16, 8]       # merged, top wins
    assert cfg.embedding.dim == 32 and cfg.train.epochs == 5
    dim, sharding, opt = cfg.embedding.for_table("movie_id")
    assert (dim, sharding, opt.name) == (8, "table_wise", "cfsgd")
    assert cfg.embedding.for_table("user_id")[0] == 32


@pytest.mark.parametrize("override, message", [
    ("--model.bogus=1", "unknown key(s) ['bogus']"),
    ("--model.name=resnet", "'resnet' is not one of"),
    ("--train.epochs=two", "expected an integer"),
    ("--embedding.optimizer.lexico=true", "lexico: needs one of our kernels"),
    ("--embedding.sharding_type=diagonal", "'diagonal' is not one of"),
    ("model.name", "expected --section.field=value"),
])
def test_bad_values_rejected(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 parses 1e-3 as a string; users write it that way on the command line and in files
    p = tmp_path / "c.yaml"
    p.write_text("dense_optim:\n  lr: 1e-3\n")
    cfg = load_config(str(p), ["--embedding.optimizer.lr=5e-2"])
    assert cfg.dense_optim.lr == 1e-3 and cfg.embedding.optimizer.lr == 5e-2
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(None, ["--embedding.optimizer.lr=fast"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(str(bad))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--model.mlp=[3,2]", "--embedding.tables.x.dim=4"])
    dump(cfg, tmp_path / "resolved.yaml")
    again = load(Config, tmp_path / "resolved.yaml")
    assert again == cfg


def test_toml_configs_supported(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[model]\nname = "autoint"\n[train]\nepochs = 7\n')
    cfg = load_config(str(p))
    assert cfg.model.name == "autoint" and cfg.train.epochs == 7


def test_switching_the_optimizer_alone_gives_its_own_default_lr():
    """A user who writes only --embedding.optimizer.name=X gets X's default step size (DEFAULT_LR), not
    the lr another optimizer needed; an explicit lr still wins and the saved config records the value."""
    from trainer.optim.names import DEFAULT_LR

    for name in ("cfsgd", "exact_rowwise_adagrad", "exact_sgd", "rowwise_adagrad"):
        cfg = load_config(str(REPO / "configs/movielens_deepfm.yaml"), [f"--embedding.optimizer.name={name}"])
        assert cfg.embedding.optimizer.lr == DEFAULT_LR[name]
    assert DEFAULT_LR["cfsgd"] != DEFAULT_LR["exact_sgd"]   # a step size that suits one rule would not suit the other
    cfg = load_config(str(REPO / "configs/movielens_deepfm.yaml"),
                      ["--embedding.optimizer.name=cfsgd", "--embedding.optimizer.lr=0.7"])
    assert cfg.embedding.optimizer.lr == 0.7


def test_counter_bytes_is_checked():
    from trainer.config import EmbOptimConfig

    EmbOptimConfig(name="cfsgd", counter_bytes=1).validate("embedding.optimizer")
    for kw, msg in ((dict(name="cfsgd", counter_bytes=3), "counter_bytes: 3 is not one of"),
                    (dict(name="exact_rowwise_adagrad", counter_bytes=2), "our cfsgd kernel's option"),
                    (dict(name="cfsgd", counter_bytes=2, counter_halflife=100.0), "counter_halflife < 0")):
        with pytest.raises(ConfigError, match=msg):
            EmbOptimConfig(**kw).validate("embedding.optimizer")
