"""Nothing a user owns is lost (issue 17, classes 1-3), through the real CLI in-process:

1. an output that is one of the command's inputs is refused (even with --overwrite), an existing output
   needs --overwrite, outputs of different inputs never collide, evaluation results are kept per split;
2. a run folder that another live process has locked is refused;
3. a resumed run removes the temp files a killed save left behind.

Each refusal is one `error: ...` line naming the path, exit code 1, and the file is byte-for-byte (and
mtime) untouched. Unit-level variants: tests/engine/test_runlock.py, tests/engine/test_temp_leftovers.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
from PIL import Image

from dusss.checkpoint import save_checkpoint
from dusss.cli import main
from dusss.engine.runlock import LOCK_FILE
from dusss.engine.runs import prepare_run_dir
from dusss.models.unet import UNet, UNetConfig

SMALL = ["--width", "4", "--image-size", "32", "--device", "cpu", "--quiet", "--epochs", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, phantom_split, tiny_vlm_checkpoint) -> dict[str, Path]:
    """Tiny phantoms + split, an untrained 4-wide segmentation run, and a pretrain run holding a VLM."""
    root = tmp_path_factory.mktemp("safety")
    manifest, split = phantom_split(root)
    cfg = UNetConfig(base_width=4)
    run = root / "seg"
    save_checkpoint(run / "model.safetensors", UNet(cfg).state_dict(), "segmentation",
                    {"unet": dataclasses.asdict(cfg), "image_size": 32, "threshold": 0.5, "method": "supervised"})
    vlm_run = prepare_run_dir(root / "vlmrun", {"epochs": 1}, kind="pretrain")
    vlm = tiny_vlm_checkpoint(vlm_run / "vlm.safetensors")
    return {"root": root, "manifest": manifest, "split": split, "run": run, "vlm_run": vlm_run, "vlm": vlm,
            "image": manifest.parent / "images" / "phantom_0000.png"}


def _snapshot(*paths: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], *names: object) -> str:
    """Run argv, expect exit 1 and one `error:` line that contains every one of `names`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------- class 1
def test_export_onto_the_trained_model_is_refused(world: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run = world["run"]
    before = _snapshot(run / "model.safetensors", run / "model.json")
    for extra in ([], ["--overwrite"]):
        line = _refused(capsys, ["export", "--model", run, "--format", "torchscript",
                                 "--out", run / "model.safetensors", *extra], run / "model.safetensors")
        assert "is an input of this command (--model)" in line
    # `--out RUN/model` would write its description to RUN/model.json, the checkpoint's sidecar
    _refused(capsys, ["export", "--model", run, "--format", "torchscript", "--out", run / "model", "--overwrite"],
             run / "model.json", "sidecar")
    assert _snapshot(*before) == before


def test_export_replaces_an_existing_file_only_with_overwrite(world: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "unet.pt"
    out.write_bytes(b"mine")
    before = _snapshot(out)
    _refused(capsys, ["export", "--model", world["run"], "--format", "torchscript", "--out", out],
             out, "already exists", "--overwrite")
    assert _snapshot(out) == before and not Path(f"{out}.json").exists()
    main(["export", "--model", str(world["run"]), "--format", "torchscript", "--out", str(out), "--overwrite"])
    assert out.read_bytes() != b"mine" and Path(f"{out}.json").is_file()


def test_split_onto_its_manifest_is_refused(world: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    manifest = world["manifest"]
    before = _snapshot(manifest, world["image"])
    for extra in ([], ["--overwrite"]):
        _refused(capsys, ["data", "split", manifest, "--labeled", "0.5", "--out", manifest, *extra],
                 manifest, "is an input of this command (MANIFEST)")
    # an image the manifest names is an input too
    _refused(capsys, ["data", "split", manifest, "--labeled", "0.5", "--out", world["image"], "--overwrite"],
             world["image"], "image of manifest row 2")
    assert _snapshot(*before) == before
    # an existing split file needs --overwrite
    out = tmp_path / "s.json"
    main(["data", "split", str(manifest), "--labeled", "0.5", "--out", str(out)])
    first = _snapshot(out)
    _refused(capsys, ["data", "split", manifest, "--labeled", "0.25", "--out", out], out, "already exists")
    assert _snapshot(out) == first
    main(["data", "split", str(manifest), "--labeled", "0.25", "--out", str(out), "--overwrite"])
    assert json.loads(out.read_text())["labeled_fraction"] == 0.25


def test_train_overwrite_never_deletes_the_vlm_it_reads(world: dict[str, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    vlm_run, vlm = world["vlm_run"], world["vlm"]
    before = _snapshot(vlm, vlm.with_suffix(".json"), vlm_run / "run.json")
    _refused(capsys, ["train", "--data", world["manifest"], "--splits", world["split"], "--out", vlm_run,
                      "--method", "dusss", "--vlm", vlm, "--overwrite", *SMALL],
             vlm, "is an input of this command (--vlm)", "--overwrite would clear")
    assert _snapshot(*before) == before
    assert sorted(p.name for p in vlm_run.iterdir()) == ["config.yaml", "run.json", "versions.json",
                                                         "vlm.json", "vlm.safetensors"]


def test_predict_never_writes_two_inputs_to_one_mask(world: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a" / "scan.png", tmp_path / "b" / "scan.png"
    for p, src in ((a, world["image"]), (b, world["manifest"].parent / "images" / "phantom_0001.png")):
        p.parent.mkdir()
        p.write_bytes(src.read_bytes())
    out = tmp_path / "P"
    main(["predict", "--model", str(world["run"]), str(a), str(b), "--out", str(out)])
    assert "2 mask(s) written" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a__scan_mask.png", "a__scan_overlay.png",
                                                     "b__scan_mask.png", "b__scan_overlay.png"]
    # a second prediction into the same folder needs --overwrite
    before = _snapshot(*out.iterdir())
    _refused(capsys, ["predict", "--model", world["run"], a, b, "--out", out], out / "a__scan_mask.png",
             "already exists")
    assert _snapshot(*before) == before
    # an input that is another input's mask path is refused even with --overwrite
    c = out / "a__scan.png"
    c.write_bytes(a.read_bytes())
    _refused(capsys, ["predict", "--model", world["run"], out / "a__scan_mask.png", c, "--out", out, "--overwrite"],
             out / "a__scan_mask.png", "is an input of this command (image)")
    assert _snapshot(*before) == before


def test_predict_refuses_names_only_the_extension_tells_apart(world: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    png, tif = tmp_path / "scan.png", tmp_path / "scan.tif"
    Image.open(world["image"]).save(png)
    Image.open(world["image"]).save(tif)
    _refused(capsys, ["predict", "--model", world["run"], png, tif, "--out", tmp_path / "P"], tif, "same output name")
    assert not (tmp_path / "P").exists()


def test_import_lvit_and_synth_keep_an_existing_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "lvit" / "Train_Folder"
    (src / "img").mkdir(parents=True)
    (src / "labelcol").mkdir()
    Image.new("L", (32, 32), 128).save(src / "img" / "x.png")
    Image.new("L", (32, 32), 0).save(src / "labelcol" / "x.png")
    (src / "Train_text.csv").write_text("Image,Description\nx.png,no lesion\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.csv").write_text("mine\n")
    before = _snapshot(out / "manifest.csv")
    _refused(capsys, ["data", "import-lvit", tmp_path / "lvit", out], out / "manifest.csv", "--overwrite")
    _refused(capsys, ["data", "synth", out, "--n", "3", "--size", "32"], out / "manifest.csv", "--overwrite")
    assert _snapshot(out / "manifest.csv") == before
    assert not (out / "images").exists()

    # synth over an earlier synth: manifest and images are kept without --overwrite
    main(["data", "synth", str(tmp_path / "ph"), "--n", "3", "--size", "32"])
    files = [tmp_path / "ph" / "manifest.csv", *sorted((tmp_path / "ph").glob("*/phantom_*.png"))]
    first = _snapshot(*files)
    _refused(capsys, ["data", "synth", tmp_path / "ph", "--n", "3", "--size", "32", "--seed", "1"],
             tmp_path / "ph" / "manifest.csv", "and 6 more file(s)")
    assert _snapshot(*files) == first
    main(["data", "synth", str(tmp_path / "ph"), "--n", "3", "--size", "32", "--seed", "1", "--overwrite"])
    main(["data", "import-lvit", str(tmp_path / "lvit"), str(out), "--overwrite"])
    assert "x.png" in (out / "manifest.csv").read_text()


def test_evaluate_keeps_each_split_and_replaces_only_with_overwrite(world: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.safetensors", "model.json"):
        (run / name).write_bytes((world["run"] / name).read_bytes())
    base = ["evaluate", "--model", str(run), "--data", str(world["manifest"]), "--device", "cpu"]
    main([*base, "--split", "test"])
    test = _snapshot(run / "eval" / "test" / "metrics.json", run / "eval" / "test" / "per_image.csv")
    main([*base, "--split", "val"])
    assert json.loads((run / "eval" / "val" / "metrics.json").read_text())["split"] == "val"
    assert _snapshot(*test) == test  # the test split's results are still there
    _refused(capsys, [*base, "--split", "test"], run / "eval" / "test" / "metrics.json", "already exists")
    assert _snapshot(*test) == test
    main([*base, "--split", "test", "--overwrite"])
    assert json.loads((run / "eval" / "test" / "metrics.json").read_text())["split"] == "test"
    # a checkpoint named metrics.safetensors has the sidecar metrics.json: never replaced by the results
    (run / "metrics.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    (run / "metrics.json").write_bytes((run / "model.json").read_bytes())
    side = _snapshot(run / "metrics.json")
    _refused(capsys, ["evaluate", "--model", run / "metrics.safetensors", "--data", world["manifest"], "--out", run,
                      "--overwrite"], run / "metrics.json", "is an input of this command (--model's sidecar)")
    assert _snapshot(*side) == side


def test_old_single_eval_file_is_still_read(tmp_path: Path) -> None:
    from dusss.engine.evaluate import read_eval

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"split": "test", "dice": 0.5}))
    assert read_eval(tmp_path, "test") == {"split": "test", "dice": 0.5}
    assert read_eval(tmp_path, "val") is None
    (tmp_path / "eval" / "test").mkdir()
    (tmp_path / "eval" / "test" / "metrics.json").write_text(json.dumps({"split": "test", "dice": 0.7}))
    assert read_eval(tmp_path, "test") == {"split": "test", "dice": 0.7}


def test_textmap_and_demo_never_replace_what_they_did_not_write(world: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "scan.png"
    image.write_bytes(world["image"].read_bytes())
    before = _snapshot(image)
    _refused(capsys, ["textmap", image, "left lung", "--vlm", world["vlm"], "--out", image, "--overwrite"],
             image, "is an input of this command (image)")
    assert _snapshot(image) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    _refused(capsys, ["demo", "--out", mine, "--quick"], mine, "is not a dusss demo folder", "thesis.tex")
    assert (mine / "thesis.tex").read_text() == "years of work"


# ------------------------------------------------------------------------------------------- class 2
@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_a_run_folder_locked_by_a_live_process_is_refused(world: dict[str, Path], tmp_path: Path, live_pid: int,
                                                          capsys: pytest.CaptureFixture[str], command: str) -> None:
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_FILE
    lock.write_text(json.dumps({"pid": live_pid, "host": socket.gethostname(), "since": "now"}))
    before = _snapshot(lock)
    if command == "train":
        argv = ["train", "--data", world["manifest"], "--splits", world["split"], "--out", out,
                "--method", "supervised", *SMALL]
    else:
        argv = ["pretrain", "--data", world["manifest"], "--out", out, "--batch-size", "4", "--random-init", *SMALL[2:]]
    for extra in ([], ["--overwrite"]):
        _refused(capsys, [*argv, *extra], out, f"in use by another dusss run (process {live_pid} on", lock)
    assert _snapshot(lock) == before
    assert sorted(os.listdir(out)) == [LOCK_FILE]


# ------------------------------------------------------------------------------------------- class 3
def test_train_resume_removes_leftovers_and_keeps_the_run(world: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from dusss.atomic import temp_file

    monkeypatch.setattr("dusss.engine.loop.plot_curves", lambda *a, **k: None)  # speed only
    out = tmp_path / "run"
    argv = ["train", "--data", str(world["manifest"]), "--splits", str(world["split"]), "--out", str(out),
            "--method", "supervised", "--batch-size", "8", *SMALL]
    main(argv)
    leftovers = []
    for name in ("state.safetensors", "model.safetensors"):
        fd, tmp = temp_file(out / name)
        os.write(fd, b"\0" * 4096)
        os.close(fd)
        leftovers.append(Path(tmp))
    model = _snapshot(out / "model.safetensors")
    capsys.readouterr()
    main([*argv, "--resume"])  # the run is finished: nothing is trained
    err = capsys.readouterr().err
    assert not any(p.exists() for p in leftovers)
    assert f"warning: {out}: removed 2 temporary file(s) left by an interrupted save" in err
    assert _snapshot(out / "model.safetensors") == model and not (out / LOCK_FILE).exists()
