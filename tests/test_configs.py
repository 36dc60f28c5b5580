"""Every shipped YAML config loads into its dataclass (unknown keys or wrong types would fail here), is found by
its name, and is in the wheel; `--set` items parse as YAML scalars."""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import pytest

from dusss.config import (
    BOUNDS_KEY,
    MAX_SEED,
    Bounds,
    bounded,
    load_config,
    packaged_configs,
    parse_overrides,
    resolve_config,
)
from dusss.engine.pretrain import PretrainConfig
from dusss.engine.train import TrainConfig
from dusss.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "dusss" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cls = PretrainConfig if path.name.startswith("pretrain") else TrainConfig
    cfg = load_config(cls, path)
    assert isinstance(cfg, cls)


def test_packaged_configs_are_found_by_name_and_listed_when_missing(tmp_path: Path) -> None:
    assert set(packaged_configs()) == {p.stem for p in CONFIGS.glob("*.yaml")} and len(packaged_configs()) == 7
    assert resolve_config("train_paper_monuseg") == resolve_config("train_paper_monuseg.yaml")
    assert resolve_config("train_paper_monuseg").samefile(CONFIGS / "train_paper_monuseg.yaml")
    assert load_config(TrainConfig, "train_paper_qata").unet.base_width == 64
    own = tmp_path / "train_paper_qata.yaml"  # a file of that name is the user's, and wins
    own.write_text("epochs: 3\n")
    assert resolve_config(own) == own
    with pytest.raises(ConfigError, match=r"nope: config file not found \(packaged configs, usable by name: .*train_paper_qata"):
        resolve_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config(tmp_path / "train_paper_qata")  # a folder part: only that path


def test_the_wheel_ships_the_configs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("dusss-*.whl")
    shipped = {n.removeprefix("dusss/configs/") for n in zipfile.ZipFile(wheel).namelist() if "/configs/" in n}
    assert shipped == {p.name for p in CONFIGS.glob("*.yaml")}


def test_set_items_parse_as_yaml_scalars() -> None:
    assert parse_overrides(["semi.ema_decay=0.5", "lr=2e-3", "epochs=7", "augment=false", "vlm=", "method=mt",
                            "unet.base_width=8", "epochs=9"]) == {
        "semi.ema_decay": 0.5, "lr": 0.002, "epochs": 9, "augment": False, "vlm": "", "method": "mt",
        "unet.base_width": 8}
    assert parse_overrides(["semi.text_mask.skip_channels=null"]) == {"semi.text_mask.skip_channels": None}
    for bad in ("epochs", "=3", "semi..x=1", "a=[1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_overrides([bad])


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


# --- every numeric field range-checked in one place (issue 17, class 7) --------------------------------------


def _numeric_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _numeric_fields(tp, f"{prefix}{f.name}.")
            continue
        leaves = {a for a in typing.get_args(tp) if a is not type(None)} | ({tp} if not typing.get_args(tp) else set())
        if leaves & {int, float}:
            out.append((prefix + f.name, f))
    return out


@pytest.mark.parametrize("cls", [TrainConfig, PretrainConfig], ids=lambda c: c.__name__)
def test_every_numeric_field_declares_its_bounds(cls: type) -> None:
    fields = _numeric_fields(cls)
    assert len(fields) > 20
    missing = [name for name, f in fields if BOUNDS_KEY not in f.metadata]
    assert missing == []
    for name, f in fields:  # finite, two-sided: nothing numeric is unbounded above
        b = f.metadata[BOUNDS_KEY]
        assert b.lo is not None and b.hi is not None and math.isfinite(b.lo) and math.isfinite(b.hi), name


BAD_VALUES = {
    # name: (config class, YAML text or None, dotted overrides (flags), expected message)
    "yaml-weight-decay": (TrainConfig, "weight_decay: -1\n", {}, "{cfg}: config.weight_decay must be in [0, 1], got -1.0"),
    "yaml-warmup": (TrainConfig, "warmup_fraction: 5\n", {}, "{cfg}: config.warmup_fraction must be in [0, 1], got 5.0"),
    "flag-lr-inf": (TrainConfig, None, {"lr": float("inf")}, "config.lr must be a finite number in (0, 10], got inf"),
    "flag-lr-nan": (TrainConfig, None, {"lr": float("nan")}, "config.lr must be a finite number in (0, 10], got nan"),
    "flag-workers": (TrainConfig, None, {"num_workers": -1}, "config.num_workers must be in [0, 256], got -1"),
    "flag-seed": (TrainConfig, None, {"seed": -5}, "config.seed must be in [0, 2147483647], got -5"),
    "flag-image-size": (TrainConfig, None, {"image_size": 100000}, "config.image_size must be in [32, 4096], got 100000"),
    "yaml-nested-ema": (TrainConfig, "semi:\n  ema_decay: 1.5\n", {}, "{cfg}: config.semi.ema_decay must be in [0, 1), got 1.5"),
    "yaml-nested-perturb": (TrainConfig, "semi:\n  perturb:\n    blur_sigma: [0.1, .nan]\n", {},
                            "{cfg}: config.semi.perturb.blur_sigma[1] must be a finite number in (0, 100], got nan"),
    "yaml-text-mask": (TrainConfig, "semi:\n  text_mask:\n    kappa_init: .inf\n", {},
                       "{cfg}: config.semi.text_mask.kappa_init must be a finite number in (0, 1000], got inf"),
    "flag-unet": (TrainConfig, None, {"unet.base_width": 0}, "config.unet.base_width must be in [1, 1024], got 0"),
    "flag-overrides-file": (TrainConfig, "lr: 0.001\n", {"lr": -1.0}, "config.lr must be in (0, 10], got -1.0"),
    "pretrain-vlm-image": (PretrainConfig, None, {"vlm.image.image_size": 100000},
                           "config.vlm.image.image_size must be in [16, 4096], got 100000"),
    "pretrain-objective": (PretrainConfig, "objective:\n  sss_eps: 0\n", {},
                           "{cfg}: config.objective.sss_eps must be in (0, 1], got 0.0"),
    "pretrain-text": (PretrainConfig, "vlm:\n  text:\n    dropout: 2\n", {},
                      "{cfg}: config.vlm.text.dropout must be in [0, 1), got 2.0"),
    "pretrain-encoder-lr": (PretrainConfig, None, {"encoder_lr": -1e-5}, "config.encoder_lr must be in [0, 10]"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_numbers_out_of_range_are_refused_naming_the_field_and_the_file(tmp_path: Path, case: str) -> None:
    cls, text, overrides, expected = BAD_VALUES[case]
    cfg = None
    if text is not None:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(cls, cfg, overrides)
    message = str(err.value)
    assert message.startswith(expected.format(cfg=cfg)), message
    assert (cfg is not None and str(cfg) in message) == ("{cfg}" in expected)


def test_direct_construction_goes_through_the_same_check() -> None:
    from dusss.methods.segmentation import SegMethodConfig

    with pytest.raises(ConfigError, match=r"^lr must be a finite number in \(0, 10\], got nan$"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ConfigError, match=r"^semi.ema_decay must be in \[0, 1\), got 1.0$"):
        SegMethodConfig(ema_decay=1.0)
    assert TrainConfig(image_size=4096, seed=MAX_SEED).image_size == 4096


def test_bounds_describe_and_contain() -> None:
    assert Bounds(0, 1, hi_open=True).describe() == "in [0, 1)" and not Bounds(0, 1, hi_open=True).contains(1)
    assert Bounds(lo=0, lo_open=True).describe() == "> 0" and Bounds(hi=2.5).describe() == "<= 2.5"
    assert Bounds(0.5, 1).contains(0.5) and not Bounds(0.5, 1, lo_open=True).contains(0.5)
    with pytest.raises(ValueError):
        bounded(1, ge=0, gt=0)
