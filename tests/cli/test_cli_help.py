"""The CLI explains itself: every option of every command has help text, `dusss methods` lists what the
registries hold, and `--set KEY=VALUE` reaches any config key (and refuses a malformed or unknown one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from dusss.cli import _register, app
from dusss.methods.pretrain import PRETRAIN_METHODS
from dusss.methods.segmentation import SEG_METHODS
from dusss.testing import run_cli_in_process

run = run_cli_in_process  # (exit code, stdout, stderr) of `dusss ARGV`, in process


def _commands(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (typer may bundle its own copy of click)
            out += _commands(cmd, f"{prefix}{name} ")
        else:
            out.append((prefix + name, cmd))
    return out


def test_every_option_and_argument_of_every_command_has_help() -> None:
    _register()
    commands = _commands(typer.main.get_command(app))
    assert {"pretrain", "train", "evaluate", "predict", "textmap", "demo", "export", "methods", "data split"} <= {
        name for name, _ in commands}
    missing = [f"{name} {param.name}" for name, cmd in commands for param in cmd.params
               if not (getattr(param, "help", None) or "").strip() and param.name != "help"]
    assert missing == []
    assert all((cmd.help or "").strip() for _, cmd in commands)


def test_methods_lists_every_registered_method(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert sorted(listed) == sorted([*PRETRAIN_METHODS, *SEG_METHODS])
    assert "dusss" in out and "[needs --vlm]" in out


def _train_args(manifest: Path, split: Path, out: Path) -> list[str]:
    return ["train", "--data", str(manifest), "--splits", str(split), "--out", str(out), "--method", "supervised",
            "--epochs", "1", "--width", "4", "--image-size", "32", "--device", "cpu", "--quiet"]


def test_set_reaches_nested_keys_and_wins_over_flags(tmp_path: Path, phantom_split,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    manifest, split = phantom_split(tmp_path)
    args = _train_args(manifest, split, tmp_path / "run")
    code, _, err = run([*args, "--set", "semi.ema_decay=0.5", "--set", "unet.base_width=8", "--set", "lr=2e-3",
                        "--set", "augment=false"], capsys)
    assert code == 0, err
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (cfg["semi"]["ema_decay"], cfg["unet"]["base_width"], cfg["lr"], cfg["augment"]) == (0.5, 8, 2e-3, False)


@pytest.mark.parametrize(("item", "message"), [
    ("semi.no_such_key=1", "unknown key(s) ['no_such_key']"),
    ("epochs", "--set 'epochs': expected KEY=VALUE"),
    ("epochs=-3", "epochs"),
    ("epochs.x=1", "override epochs.x: epochs is not a section"),
])
def test_set_refuses_bad_items_before_anything_is_written(tmp_path: Path, phantom_split,
                                                          capsys: pytest.CaptureFixture[str], item: str,
                                                          message: str) -> None:
    manifest, split = phantom_split(tmp_path)
    code, _, err = run([*_train_args(manifest, split, tmp_path / "run"), "--set", item], capsys)
    assert code == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists()
