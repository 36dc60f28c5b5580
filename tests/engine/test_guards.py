"""Guards, through the CLI (in-process `dusss.cli.main`): NaN/inf loss, taken output folders, checkpoints of
the wrong kind, and config validation before any work. Each failure is one `error:` line, exit code 1,
no traceback, and nothing written where the command would have written.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dusss.checkpoint import save_checkpoint, sidecar_path
from dusss.cli import main
from dusss.methods.segmentation import SEG_METHODS
from dusss.models.unet import UNet, UNetConfig
from dusss.testing import run_cli_in_process

TRAIN_FLAGS = ["--batch-size", "2", "--width", "4", "--image-size", "32", "--device", "cpu", "--seed", "0",
               "--quiet"]


_cli = run_cli_in_process  # (exit code, stdout, stderr) of `dusss ARGV`, in process


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, _, err = _cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 1, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _no_curves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dusss.engine.loop.plot_curves", lambda *a, **k: None)  # speed only


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, phantom_split, tiny_vlm_checkpoint) -> dict[str, Path]:
    """Phantom data, a split, a trained 1-epoch run, a tiny real VLM and some foreign files."""
    root = tmp_path_factory.mktemp("guards")
    manifest, split = phantom_split(root)
    run = root / "seg"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dusss.engine.loop.plot_curves", lambda *a, **k: None)
        main(["train", "--data", str(manifest), "--splits", str(split), "--out", str(run), "--method",
              "supervised", "--epochs", "1", *TRAIN_FLAGS])

    vlm = tiny_vlm_checkpoint(root / "vlm" / "vlm.safetensors")

    foreign = root / "foreign"
    foreign.mkdir()
    rand = foreign / "random.safetensors"  # random bytes, no sidecar
    rand.write_bytes(bytes(range(256)) * 8)
    rand_side = foreign / "model.safetensors"  # random bytes beside a genuine sidecar
    rand_side.write_bytes(bytes(range(256)) * 8)
    shutil.copy(sidecar_path(run / "model.safetensors"), sidecar_path(rand_side))
    plain_st = foreign / "hf.safetensors"  # a valid safetensors file from elsewhere (no dusss sidecar)
    save_file({"weight": torch.zeros(2, 2)}, str(plain_st))
    wide = foreign / "wide" / "model.safetensors"  # sidecar says width 8, tensors are width 4
    save_checkpoint(wide, UNet(UNetConfig(base_width=4)).state_dict(), "segmentation",
                    {"unet": dataclasses.asdict(UNetConfig(base_width=8)), "image_size": 32, "threshold": 0.5})
    return {"root": root, "manifest": manifest, "split": split, "run": run, "vlm": vlm, "rand": rand,
            "rand_side": rand_side, "plain": plain_st, "wide": wide,
            "image": manifest.parent / "images" / "phantom_0000.png"}


# --- NaN / inf loss ----------------------------------------------------------------------------------------

def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cls = SEG_METHODS["supervised"]
    original = cls.loss

    def poisoned(self, labeled, unlabeled=None, step=0, total_steps=1):  # type: ignore[no-untyped-def]
        loss, logs = original(self, labeled, unlabeled, step, total_steps)
        return (loss * float("nan") if step >= 5 else loss), logs  # step 5 = 2nd step of epoch 2

    monkeypatch.setattr(cls, "loss", poisoned)
    out = tmp_path / "run"
    line = _one_line_error(["train", "--data", str(world["manifest"]), "--splits", str(world["split"]),
                            "--out", str(out), "--method", "supervised", "--epochs", "3", *TRAIN_FLAGS], capsys)
    assert line == f"error: loss became nan at step 5; last good checkpoint: {out / 'model.safetensors'}"
    assert (out / "model.safetensors").is_file() and not (out / "DONE").exists()
    assert json.loads((out / "state.json").read_text())["epoch"] == 1


def test_diverging_loss_stops_before_any_checkpoint(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A learning rate that diverges at once (--lr 1e30) is now refused by the config's bounds (below), so the
    # divergence is simulated: an infinite loss from step 1 on.
    cls = SEG_METHODS["supervised"]
    original = cls.loss

    def diverging(self, labeled, unlabeled=None, step=0, total_steps=1):  # type: ignore[no-untyped-def]
        loss, logs = original(self, labeled, unlabeled, step, total_steps)
        return (loss * float("inf") if step >= 1 else loss), logs

    monkeypatch.setattr(cls, "loss", diverging)
    out = tmp_path / "run"
    line = _one_line_error(["train", "--data", str(world["manifest"]), "--splits", str(world["split"]),
                            "--out", str(out), "--method", "supervised", "--epochs", "2", *TRAIN_FLAGS], capsys)
    assert line.startswith("error: loss became ") and line.endswith("; no checkpoint written yet")
    assert not (out / "model.safetensors").exists()


def test_an_absurd_learning_rate_is_refused_before_the_run_folder(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    line = _one_line_error(["train", "--data", str(world["manifest"]), "--splits", str(world["split"]),
                            "--out", str(out), "--method", "supervised", "--epochs", "2", "--lr", "1e30",
                            *TRAIN_FLAGS], capsys)
    assert line == "error: config.lr must be in (0, 10], got 1e+30"
    assert not out.exists()


# --- output folders ----------------------------------------------------------------------------------------

def test_a_folder_holding_another_run_is_never_overwritten(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "seg"
    shutil.copytree(world["run"], run)
    before = _snapshot(run)
    base = ["train", "--data", str(world["manifest"]), "--splits", str(world["split"]), "--out", str(run),
            "--method", "supervised", *TRAIN_FLAGS]

    line = _one_line_error([*base, "--epochs", "2"], capsys)
    # (the copy's `out` differs too: "epochs: 1 -> 2 and 1 more")
    assert f"{run}: already holds a run (config differs: epochs: 1 -> 2" in line and "--overwrite" in line
    line = _one_line_error(["pretrain", "--data", str(world["manifest"]), "--out", str(run), "--epochs", "1"], capsys)
    assert f"{run}: already holds a run (of kind 'train')" in line
    line = _one_line_error(["pretrain", "--data", str(world["manifest"]), "--out", str(run), "--resume"], capsys)
    assert "holds a 'train' run, cannot resume it as 'pretrain'" in line
    # resuming with another architecture (flag or config file) is refused before anything is written
    line = _one_line_error([*base, "--epochs", "1", "--resume", "--width", "8"], capsys)
    assert line.startswith(f"error: {run}: cannot resume with a different unet.base_width: 4 -> 8")
    wide = tmp_path / "wide.yaml"
    wide.write_text("unet:\n  base_width: 8\n")
    line = _one_line_error([*base[:-len(TRAIN_FLAGS)], "--epochs", "1", "--config", str(wide), "--resume",
                            "--batch-size", "2", "--image-size", "32", "--device", "cpu", "--seed", "0"], capsys)
    assert "cannot resume with a different unet.base_width: 4 -> 8" in line
    line = _one_line_error([*base, "--epochs", "1", "--resume", "--method", "mt"], capsys)
    assert "cannot resume with a different method: 'supervised' -> 'mt'" in line
    assert _snapshot(run) == before

    # a folder with someone else's files
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    line = _one_line_error([*base[:6], str(other), *base[7:], "--epochs", "1"], capsys)
    assert f"{other}: folder is not empty and holds no dusss run" in line
    assert [p.name for p in other.iterdir()] == ["thesis.tex"]

    # --overwrite replaces the run
    code, _, err = _cli([*base, "--epochs", "2", "--overwrite"], capsys)
    assert code == 0, err
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# --- checkpoints of the wrong kind ---------------------------------------------------------------------------

WRONG = {
    # name: (argv template, expected fragment); {x} are filled from the `world` fixture
    "vlm-as-evaluate-model": (["evaluate", "--model", "{vlm}", "--data", "{manifest}", "--out", "{out}"],
                              "{vlm}: is a 'vlm' checkpoint, expected 'segmentation'"),
    "vlm-as-predict-model": (["predict", "{image}", "--model", "{vlm}", "--out", "{out}"],
                             "{vlm}: is a 'vlm' checkpoint, expected 'segmentation'"),
    "vlm-as-export-model": (["export", "--model", "{vlm}", "--format", "onnx", "--out", "{out}/m.onnx"],
                            "{vlm}: is a 'vlm' checkpoint, expected 'segmentation'"),
    "train-state-as-model": (["evaluate", "--model", "{run}/state.safetensors", "--data", "{manifest}",
                              "--out", "{out}"], "is a 'train_state' checkpoint, expected 'segmentation'"),
    "segmentation-as-train-vlm": (["train", "--data", "{manifest}", "--splits", "{split}", "--out", "{out}",
                                   "--method", "dusss", "--vlm", "{run}/model.safetensors", "--epochs", "1",
                                   "--width", "4", "--image-size", "32", "--device", "cpu"],
                                  "{run}/model.safetensors: is a 'segmentation' checkpoint, expected 'vlm'"),
    "segmentation-as-textmap-vlm": (["textmap", "{image}", "left lung", "--vlm", "{run}/model.safetensors",
                                     "--out", "{out}/h.png"],
                                    "{run}/model.safetensors: is a 'segmentation' checkpoint, expected 'vlm'"),
    "random-bytes-no-sidecar": (["evaluate", "--model", "{rand}", "--data", "{manifest}", "--out", "{out}"],
                                "{rand}: no JSON sidecar random.json; not a dusss checkpoint"),
    "random-bytes-with-sidecar": (["predict", "{image}", "--model", "{rand_side}", "--out", "{out}"],
                                  "{rand_side}: cannot read safetensors file"),
    "random-bytes-as-train-vlm": (["train", "--data", "{manifest}", "--splits", "{split}", "--out", "{out}",
                                   "--method", "amvlm", "--vlm", "{rand_side}", "--epochs", "1", "--width", "4",
                                   "--image-size", "32", "--device", "cpu"], "{rand_side}: "),
    "foreign-safetensors": (["export", "--model", "{plain}", "--format", "torchscript", "--out", "{out}/m.pt"],
                            "{plain}: no JSON sidecar hf.json; not a dusss checkpoint"),
    "width-8-config-width-4-weights": (["evaluate", "--model", "{wide}", "--data", "{manifest}", "--out", "{out}"],
                                       "{wide}: architecture differs from the checkpoint: shape mismatch at"),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_checkpoint_is_a_one_line_error(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    values = {k: str(v) for k, v in world.items()} | {"out": str(tmp_path / "out")}
    argv, expected = WRONG[case]
    line = _one_line_error([a.format(**values) for a in argv], capsys)
    assert expected.format(**values) in line
    assert not (tmp_path / "out").exists()


# --- config validation before any work ---------------------------------------------------------------------

CONFIGS = {
    # name: (command, YAML text or None, extra flags, expected fragment)
    "unknown-key": ("train", "epochs: 2\nlearning_rate: 0.1\n", [], "unknown key 'learning_rate'"),
    "unknown-nested-key": ("train", "unet:\n  depth: 5\n", [], ".unet: unknown key 'depth'"),
    "wrong-type-int": ("train", "epochs: ten\n", [], "config.epochs: expected an integer, got 'ten'"),
    "wrong-type-bool": ("train", "augment: maybe\n", [], "config.augment: expected true/false, got 'maybe'"),
    "wrong-type-float-for-int": ("train", "unet:\n  base_width: 4.5\n", [], "expected an integer, got 4.5"),
    "wrong-type-section": ("train", "unet: 4\n", [], "config.unet: expected a mapping, got int"),
    "wrong-literal": ("train", "semi:\n  seg_loss: focal\n", [], "'focal' is not one of"),
    "not-a-mapping": ("train", "- epochs\n", [], "top level must be a mapping"),
    "not-yaml": ("train", "epochs: [1, 2\n", [], "not valid YAML"),
    "negative-epochs": ("train", None, ["--epochs", "-1"], "config.epochs must be in [1, 100000], got -1"),
    "bad-precision": ("train", None, ["--precision", "fp8"], "precision must be fp32|bf16|fp16, got 'fp8'"),
    "zero-lr": ("train", None, ["--lr", "0"], "config.lr must be in (0, 10], got 0.0"),
    "threshold-out-of-range": ("train", "threshold: 1.5\n", [], "threshold must be in (0, 1), got 1.5"),
    "image-size-not-multiple-of-16": ("train", None, ["--image-size", "40"], "multiple of 16"),
    "unknown-method": ("train", None, ["--method", "unet++"], "method: 'unet++' is not one of"),
    "negative-ema-decay": ("train", "semi:\n  ema_decay: -0.5\n", [], "ema_decay must be in [0, 1)"),
    "pretrain-unknown-key": ("pretrain", "vlm:\n  embed: 8\n", [], "unknown key 'embed'"),
    "pretrain-batch-1": ("pretrain", None, ["--batch-size", "1"], "config.batch_size must be in [2, 65536], got 1"),
    "pretrain-negative-epochs": ("pretrain", None, ["--epochs", "0"], "config.epochs must be in [1, 100000], got 0"),
    "pretrain-bad-precision": ("pretrain", "precision: fp64\n", [], "precision must be fp32|bf16|fp16"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_invalid_config_fails_before_any_work(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    command, text, flags, expected = CONFIGS[case]
    out = tmp_path / "run"
    argv = [command, "--data", str(world["manifest"]), "--out", str(out)]
    if command == "train":
        argv += ["--splits", str(world["split"]), "--method", "supervised"]
    if text is not None:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(text)
        argv += ["--config", str(cfg)]
    line = _one_line_error([*argv, *flags], capsys)
    assert expected in line
    assert not out.exists()


@pytest.mark.parametrize("labeled", ["0", "1.5", "-0.25", "nan"])
def test_impossible_labeled_ratio_writes_no_split(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], labeled: str
) -> None:
    out = tmp_path / "split.json"
    line = _one_line_error(["data", "split", str(world["manifest"]), "--labeled", labeled, "--out", str(out)],
                           capsys)
    assert "labeled fraction must be in (0, 1]" in line
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--image-encoder", "--text-encoder"])
def test_missing_encoder_folder_fails_before_the_run_folder_exists(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    out = tmp_path / "run"
    line = _one_line_error(["pretrain", "--data", str(world["manifest"]), "--out", str(out), "--batch-size", "4",
                            "--image-size", "32", "--epochs", "1", "--device", "cpu", "--quiet", flag,
                            str(tmp_path / "no-model")], capsys)
    assert f"{tmp_path / 'no-model'}: not a Hugging Face model folder" in line
    assert not out.exists()


def test_nothing_in_the_package_unpickles() -> None:
    """Weights load through safetensors; the one `torch.load` (EfficientNet-Lite0's packaged .pth state dict)
    is `weights_only=True`; no pickle, no `torch.jit.load`, no `np.load(allow_pickle=True)`."""
    import re

    import dusss

    src = Path(dusss.__file__).parent
    loads = []
    for path in sorted(src.rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib|cloudpickle)\b", text, re.MULTILINE), path
        assert "allow_pickle=True" not in text and "torch.jit.load(" not in text, path
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), f"{path}: {call.group(0)}"
            loads.append(path.name)
    assert loads == ["efficientnet_lite.py"]


def test_pretraining_refuses_a_patient_in_two_splits(world: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Step 1 reads the train rows only, but a test patient's images must not shape the VLM through another
    row of the same case: the leak is refused before the run folder exists (issue 17, class 4)."""
    import csv

    with open(world["manifest"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    train = next(r for r in rows if r["split"] == "train")
    test = next(r for r in rows if r["split"] == "test")
    test["case_id"] = train["case_id"]
    leaky = world["manifest"].parent / "leaky.csv"
    with open(leaky, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "run"
    line = _one_line_error(["pretrain", "--data", str(leaky), "--out", str(out), "--batch-size", "4",
                            "--image-size", "32", "--epochs", "1", "--device", "cpu", "--quiet", "--random-init"],
                           capsys)
    assert f"{leaky}: case {train['case_id']!r} has rows in train (row" in line and "and test (row" in line
    assert not out.exists()
