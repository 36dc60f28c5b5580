"""Every command with bad input, through the real console script: a non-zero exit, a last stderr line that
names the problem (`error: ...`, or click's `Error: ...` for a usage error), no traceback, and nothing
written where the command would have written.

`data verify` is a report: it lists every problem it finds (one per line) and ends with
`N problem(s) in MANIFEST`; that format is pinned by tests/cli/test_data_cli.py.

The subprocesses run two at a time from one module fixture (most of their time is `import torch`); each
case is then checked by its own parametrized test. Finer variants (every wrong-kind checkpoint, every config
error, NaN loss, taken folders) run in-process in tests/engine/test_guards.py.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dusss.data.manifest import read_manifest
from dusss.data.splits import make_split, save_split
from dusss.engine.checkpoint import save_checkpoint
from dusss.engine.runs import prepare_run_dir
from dusss.models.unet import UNet, UNetConfig

ERROR, USAGE, REPORT = "error", "usage", "report"
SMALL = ["--width", "4", "--image-size", "32", "--device", "cpu", "--quiet", "--epochs", "1"]

# id: (argv with {placeholders}, what the output must be, fragment of the last line (or of the report),
#      a path that must not exist afterwards or None)
CASES: dict[str, tuple[list[str], str, str, str | None]] = {
    # data synth
    "synth/n-too-small": (["data", "synth", "{tmp}/s", "--n", "2"], ERROR, "--n must be an integer >= 3", "{tmp}/s"),
    "synth/size-zero": (["data", "synth", "{tmp}/s", "--size", "0"], ERROR, "--size must be an integer in",
                        "{tmp}/s"),
    "synth/out-under-a-file": (["data", "synth", "{afile}/sub", "--n", "3", "--size", "32"], ERROR,
                               "{afile}", None),
    "synth/n-not-a-number": (["data", "synth", "{tmp}/s", "--n", "many"], USAGE, "Invalid value for '--n'",
                             "{tmp}/s"),
    # data caption
    "caption/missing-file": (["data", "caption", "{tmp}/nope.png"], ERROR, "{tmp}/nope.png: file not found", None),
    "caption/corrupt-png": (["data", "caption", "{corrupt}"], ERROR, "{corrupt}: cannot decode image", None),
    "caption/image-not-mask": (["data", "caption", "{image}"], ERROR, "{image}: mask is not binary", None),
    "caption/bad-style": (["data", "caption", "{mask}", "--style", "poetic"], ERROR,
                          "--style must be one of qata, laterality, generic, got 'poetic'", None),
    # data import-lvit
    "import-lvit/missing-folder": (["data", "import-lvit", "{tmp}/nope", "{tmp}/o"], ERROR,
                                   "{tmp}/nope: dataset folder not found", "{tmp}/o"),
    "import-lvit/not-lvit": (["data", "import-lvit", "{notlvit}", "{tmp}/o"], ERROR,
                             "{notlvit}: not an LViT dataset", "{tmp}/o"),
    # data verify (a report)
    "verify/missing-manifest": (["data", "verify", "{tmp}/nope.csv"], REPORT, "{tmp}/nope.csv: manifest not found",
                                None),
    "verify/missing-column": (["data", "verify", "{nocol}"], REPORT, "{nocol}: missing required column(s) text",
                              None),
    "verify/corrupt-image": (["data", "verify", "{corrupt_manifest}"], REPORT, "{corrupt}: cannot decode image",
                             None),
    # data split
    "split/missing-manifest": (["data", "split", "{tmp}/nope.csv", "--labeled", "0.5", "--out", "{tmp}/s.json"],
                               ERROR, "{tmp}/nope.csv: manifest not found", "{tmp}/s.json"),
    "split/missing-column": (["data", "split", "{nocol}", "--labeled", "0.5", "--out", "{tmp}/s.json"], ERROR,
                             "{nocol}: missing required column(s) text", "{tmp}/s.json"),
    "split/labeled-0": (["data", "split", "{manifest}", "--labeled", "0", "--out", "{tmp}/s.json"], ERROR,
                        "labeled fraction must be in (0, 1], got 0.0", "{tmp}/s.json"),
    "split/labeled-1.5": (["data", "split", "{manifest}", "--labeled", "1.5", "--out", "{tmp}/s.json"], ERROR,
                          "labeled fraction must be in (0, 1], got 1.5", "{tmp}/s.json"),
    "split/labeled-not-a-number": (["data", "split", "{manifest}", "--labeled", "half", "--out", "{tmp}/s.json"],
                                   USAGE, "Invalid value for '--labeled'", "{tmp}/s.json"),
    "split/no-out": (["data", "split", "{manifest}", "--labeled", "0.5"], USAGE, "Missing option '--out'", None),
    # pretrain
    "pretrain/corrupt-image": (["pretrain", "--data", "{corrupt_manifest}", "--out", "{tmp}/r", "--random-init",
                                "--batch-size", "4", *SMALL[2:]], ERROR, "{corrupt}: cannot decode image", "{tmp}/r"),
    "pretrain/folder-holds-a-train-run": (["pretrain", "--data", "{manifest}", "--out", "{taken}", *SMALL[2:]],
                                          ERROR, "{taken}: already holds a run (of kind 'train')", None),
    # train
    "train/missing-split-file": (["train", "--data", "{manifest}", "--splits", "{tmp}/nope.json", "--out",
                                  "{tmp}/r", "--method", "mt", *SMALL], ERROR,
                                 "{tmp}/nope.json: split file not found", "{tmp}/r"),
    "train/corrupt-image": (["train", "--data", "{corrupt_manifest}", "--splits", "{corrupt_split}", "--out",
                             "{tmp}/r", "--method", "supervised", *SMALL], ERROR, "{corrupt}: cannot decode image",
                            "{tmp}/r"),
    "train/segmentation-as-vlm": (["train", "--data", "{manifest}", "--splits", "{split}", "--out", "{tmp}/r",
                                   "--method", "dusss", "--vlm", "{seg}", *SMALL], ERROR,
                                  "{seg}: is a 'segmentation' checkpoint, expected 'vlm'", "{tmp}/r"),
    "train/unknown-option": (["train", "--data", "{manifest}", "--splits", "{split}", "--out", "{tmp}/r",
                              "--epoch", "3"], USAGE, "No such option: --epoch", "{tmp}/r"),
    # evaluate
    "evaluate/missing-model": (["evaluate", "--model", "{tmp}/nope", "--data", "{manifest}"], ERROR,
                               "{tmp}/nope: checkpoint not found", None),
    "evaluate/missing-column": (["evaluate", "--model", "{seg}", "--data", "{nocol}", "--out", "{tmp}/e"], ERROR,
                                "{nocol}: missing required column(s) text", "{tmp}/e"),
    "evaluate/bad-empty-policy": (["evaluate", "--model", "{seg}", "--data", "{manifest}", "--empty-policy",
                                   "ignore", "--out", "{tmp}/e"], ERROR, "--empty-policy must be skip, one or zero",
                                  "{tmp}/e"),
    # predict
    "predict/missing-image": (["predict", "{tmp}/nope.png", "--model", "{seg}", "--out", "{tmp}/p"], ERROR,
                              "{tmp}/nope.png: file not found", "{tmp}/p"),
    "predict/corrupt-image": (["predict", "{image}", "{corrupt}", "--model", "{seg}", "--out", "{tmp}/p"], ERROR,
                              "{corrupt}: cannot decode image", "{tmp}/p"),
    "predict/no-images": (["predict", "--model", "{seg}", "--out", "{tmp}/p"], USAGE, "Missing argument 'images'",
                          "{tmp}/p"),
    # textmap
    "textmap/missing-image": (["textmap", "{tmp}/nope.png", "left lung", "--vlm", "{vlm}", "--out", "{tmp}/h.png"],
                              ERROR, "{tmp}/nope.png: file not found", "{tmp}/h.png"),
    "textmap/no-prompt": (["textmap", "{image}", "--vlm", "{vlm}"], USAGE, "Missing argument 'prompts'", None),
    # export
    "export/bad-format": (["export", "--model", "{seg}", "--format", "keras", "--out", "{tmp}/m.h5"], ERROR,
                          "export format must be one of onnx|torchscript, got 'keras'", "{tmp}/m.h5"),
    "export/bad-opset": (["export", "--model", "{seg}", "--format", "onnx", "--opset", "3", "--out",
                          "{tmp}/m.onnx"], ERROR, "opset must be an integer in", "{tmp}/m.onnx"),
    "export/no-format": (["export", "--model", "{seg}", "--out", "{tmp}/m.onnx"], USAGE, "Missing option '--format'",
                         "{tmp}/m.onnx"),
    # anything
    "dusss/unknown-command": (["segment", "x.png"], USAGE, "No such command 'segment'", None),
}


def _dusss() -> list[str]:
    script = Path(sys.executable).with_name("dusss")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dusss"]


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, phantom_split, tiny_vlm_checkpoint) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sweep")
    manifest, split = phantom_split(root)

    corrupt = root / "ph" / "images" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))  # a PNG signature, then garbage
    rows = list(csv.reader(manifest.open()))
    first_train = next(i for i, r in enumerate(rows) if i and r[3] == "train")
    rows[first_train][0] = "images/corrupt.png"
    corrupt_manifest = root / "ph" / "corrupt.csv"
    with corrupt_manifest.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    corrupt_split = root / "corrupt_split.json"
    save_split(make_split(read_manifest(corrupt_manifest), 0.5, seed=0), corrupt_split)
    nocol = root / "ph" / "nocol.csv"
    with nocol.open("w", newline="") as fh:
        csv.writer(fh).writerows([r[:2] + r[3:] for r in csv.reader(manifest.open())])  # no `text`

    cfg = UNetConfig(base_width=4)
    seg = root / "seg" / "model.safetensors"
    save_checkpoint(seg, UNet(cfg).state_dict(), "segmentation",
                    {"unet": dataclasses.asdict(cfg), "image_size": 32, "threshold": 0.5, "method": "supervised"})
    rand = root / "junk" / "random.safetensors"
    rand.parent.mkdir()
    rand.write_bytes(bytes(range(256)) * 4)
    rand_side = root / "junk" / "model.safetensors"
    rand_side.write_bytes(bytes(range(256)) * 4)
    (root / "junk" / "model.json").write_text((root / "seg" / "model.json").read_text())

    vlm = tiny_vlm_checkpoint(root / "vlm" / "vlm.safetensors")

    taken = prepare_run_dir(root / "taken", {"epochs": 1}, kind="train")
    notlvit = root / "notlvit"
    notlvit.mkdir()
    (notlvit / "readme.txt").write_text("not a dataset")
    afile = root / "afile"
    afile.write_text("a file, not a folder")
    values = {"manifest": manifest, "split": split, "corrupt": corrupt, "corrupt_manifest": corrupt_manifest,
              "corrupt_split": corrupt_split, "nocol": nocol, "seg": seg, "rand": rand, "rand_side": rand_side,
              "vlm": vlm, "taken": taken, "notlvit": notlvit, "afile": afile,
              "image": manifest.parent / "images" / "phantom_0000.png",
              "mask": manifest.parent / "masks" / "phantom_0000.png"}
    return {k: str(v) for k, v in values.items()} | {"root": str(root)}


@pytest.fixture(scope="module")
def results(world: dict[str, str]) -> dict[str, tuple[int, str, str, float, dict[str, str]]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)

    def one(case: str) -> tuple[int, str, str, float, dict[str, str]]:
        tmp = Path(world["root"]) / "cases" / case.replace("/", "__")
        tmp.mkdir(parents=True)
        values = world | {"tmp": str(tmp)}
        argv = [a.format(**values) for a in CASES[case][0]]
        t0 = time.monotonic()
        proc = subprocess.run([*_dusss(), *argv], env=env, capture_output=True, text=True, timeout=300,
                              cwd=tmp, check=False)
        return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0, values

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CASES, pool.map(one, CASES)))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_a_non_zero_exit(
    results: dict[str, tuple[int, str, str, float, dict[str, str]]], case: str
) -> None:
    code, _, err, _, values = results[case]
    _, kind, fragment, absent = CASES[case]
    fragment = fragment.format(**values)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and lines, (code, err)
    assert "Traceback" not in err, err
    last = lines[-1]
    if kind == ERROR:
        assert code == 1 and len(lines) == 1 and last.startswith("error: "), err
        assert fragment in last, (fragment, last)
    elif kind == USAGE:
        assert code == 2 and last.startswith("Error: "), err
        assert fragment in last, (fragment, last)
    else:  # the verify report: the problems, then the count
        assert code == 1 and last.endswith(f"problem(s) in {CASES[case][0][-1].format(**values)}"), err
        assert any(line.startswith(fragment) for line in lines[:-1]), (fragment, err)
    if absent is not None:
        assert not Path(absent.format(**values)).exists()
