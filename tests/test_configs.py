"""Every shipped YAML config loads into its dataclass (unknown keys or wrong types would fail here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dusss.config import load_config
from dusss.engine.pretrain import PretrainConfig
from dusss.engine.train import TrainConfig
from dusss.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cls = PretrainConfig if path.name.startswith("pretrain") else TrainConfig
    cfg = load_config(cls, path)
    assert isinstance(cfg, cls)


def test_paper_configs_use_the_paper_unet() -> None:
    cfg = load_config(TrainConfig, CONFIGS / "train_paper_qata.yaml")
    assert (cfg.unet.base_width, cfg.image_size, cfg.patience, cfg.lr) == (64, 224, 20, 3e-4)
    assert load_config(PretrainConfig, CONFIGS / "pretrain_ablation_no_sss.yaml").objective.sss is False


def test_unknown_key_and_bad_value_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(TrainConfig, bad)
    bad.write_text("epochs: -1\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_config(TrainConfig, bad)
    bad.write_text("unet: {base_width: many}\n")
    with pytest.raises(ConfigError, match="base_width"):
        load_config(TrainConfig, bad)
