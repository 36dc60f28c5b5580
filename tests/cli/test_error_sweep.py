"""Every command with bad input, through the real console script: a non-zero exit, a last stderr line that
names the problem (`error: ...`, or click's `Error: ...` for a usage error), no traceback, and nothing
written where the command would have written. A few `OK` cases pin inputs that used to be misread or to fail
late and are now processed: they exit 0, print the fragment, and write the path given.

`data verify` is a report: it lists every problem it finds (one per line) and ends with
`N problem(s) in MANIFEST`; that format is pinned by tests/cli/test_data_cli.py.

Each case is its own process, forked from one interpreter that has done the imports (`import torch` was most of
a case's time), one after another in a module fixture; each is then checked by its own parametrized test, and a
few cases also run through the console script, which must give the same exit code and output. Finer variants (every wrong-kind checkpoint, every config
error, NaN loss, taken folders) run in-process in tests/engine/test_guards.py.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dusss.checkpoint import save_checkpoint
from dusss.data.manifest import read_manifest
from dusss.data.splits import make_split, save_split
from dusss.engine.runs import prepare_run_dir
from dusss.models.unet import UNet, UNetConfig

pytestmark = pytest.mark.slow(seconds=40)  # about this long at one thread (tests/conftest.py runs it early)

ERROR, USAGE, REPORT, OK = "error", "usage", "report", "ok"
SMALL = ["--width", "4", "--image-size", "32", "--device", "cpu", "--quiet", "--epochs", "1"]

# id: (argv with {placeholders}, what the output must be, fragment of the last line (or of the report, or of
#      stdout for OK), a path that must not exist afterwards (for OK: that must exist) or None)
CASES: dict[str, tuple[list[str], str, str, str | None]] = {
    # data synth
    "synth/n-too-small": (["data", "synth", "{tmp}/s", "--n", "2"], ERROR, "--n must be an integer in [3, 1000000]", "{tmp}/s"),
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
    # issue 17, class 4: labels read wrongly without an error
    "caption/lesion-only-in-alpha": (["data", "caption", "{alpha_mask}"], OK, "{alpha_caption}", None),
    "caption/ambiguous-rgba-mask": (["data", "caption", "{ambiguous_mask}"], ERROR,
                                    "{ambiguous_mask}: ambiguous mask", None),
    "verify/patient-leakage": (["data", "verify", "{leak}"], REPORT,
                               "{leak}: case '{leak_case}' has rows in train (row 2) and test", None),
    "split/patient-leakage": (["data", "split", "{leak}", "--labeled", "0.5", "--out", "{tmp}/s.json"], ERROR,
                              "{leak}: case '{leak_case}' has rows in train (row 2) and test", "{tmp}/s.json"),
    # class 5: weights that are not safetensors
    "pretrain/image-encoder-pickle-only": (["pretrain", "--data", "{manifest}", "--out", "{tmp}/r", "--image-encoder",
                                            "{bin_vit}", "--batch-size", "4", *SMALL[2:]], ERROR,
                                           "{bin_vit}: no *.safetensors weights (found only pytorch_model.bin)",
                                           "{tmp}/r"),
    "pretrain/text-encoder-pickle-only": (["pretrain", "--data", "{manifest}", "--out", "{tmp}/r", "--text-encoder",
                                           "{bin_bert}", "--batch-size", "4", *SMALL[2:]], ERROR,
                                          "{bin_bert}: no *.safetensors weights (found only pytorch_model.bin)",
                                          "{tmp}/r"),
    # class 6: unbounded inputs
    "caption/png-declaring-20000x20000": (["data", "caption", "{bomb_png}"], ERROR,
                                          "{bomb_png}: image declares 400000000 pixels, over the limit of", None),
    "predict/nifti-declaring-20000x20000": (["predict", "{bomb_nii}", "--model", "{seg}", "--out", "{tmp}/p"], ERROR,
                                            "{bomb_nii}: image declares 20000x20000 = 400000000 pixels", "{tmp}/p"),
    "train/image-size-100000": (["train", "--data", "{manifest}", "--splits", "{split}", "--out", "{tmp}/r",
                                 "--method", "supervised", *SMALL[:2], "--image-size", "100000", *SMALL[4:]], ERROR,
                                "config.image_size must be in [32, 4096], got 100000", "{tmp}/r"),
    # class 7: options checked late or not at all
    "train/num-workers-negative": (["train", "--data", "{manifest}", "--splits", "{split}", "--out", "{tmp}/r",
                                    "--method", "supervised", *SMALL, "--num-workers", "-1"], ERROR,
                                   "config.num_workers must be in [0, 256], got -1", "{tmp}/r"),
    "train/seed-negative": (["train", "--data", "{manifest}", "--splits", "{split}", "--out", "{tmp}/r",
                             "--method", "supervised", *SMALL, "--seed", "-5"], ERROR,
                            "config.seed must be in [0, 2147483647], got -5", "{tmp}/r"),
    "train/lr-inf": (["train", "--data", "{manifest}", "--splits", "{split}", "--out", "{tmp}/r",
                      "--method", "supervised", *SMALL, "--lr", "inf"], ERROR,
                     "config.lr must be a finite number in (0, 10], got inf", "{tmp}/r"),
    "train/yaml-weight-decay-negative": (["train", "--data", "{manifest}", "--splits", "{split}", "--out", "{tmp}/r",
                                          "--method", "supervised", *SMALL, "--config", "{yaml_wd}"], ERROR,
                                         "{yaml_wd}: config.weight_decay must be in [0, 1], got -1.0", "{tmp}/r"),
    "pretrain/yaml-warmup-fraction-5": (["pretrain", "--data", "{manifest}", "--out", "{tmp}/r", "--random-init",
                                         "--batch-size", "4", *SMALL[2:], "--config", "{yaml_warmup}"], ERROR,
                                        "{yaml_warmup}: config.warmup_fraction must be in [0, 1], got 5.0", "{tmp}/r"),
    # class 8: degenerate but valid inputs are processed
    "predict/1x1-image": (["predict", "{one_px}", "--model", "{seg}", "--out", "{tmp}/p"], OK, "1 mask(s) written",
                          "{tmp}/p/one_px_overlay.png"),
}

EXPECTED_CASES = 52  # the sweep's size, reported by test_the_sweep_reports_its_count


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
    extra = _issue17_inputs(root, manifest)
    notlvit = root / "notlvit"
    notlvit.mkdir()
    (notlvit / "readme.txt").write_text("not a dataset")
    afile = root / "afile"
    afile.write_text("a file, not a folder")
    values = {"manifest": manifest, "split": split, "corrupt": corrupt, "corrupt_manifest": corrupt_manifest,
              "corrupt_split": corrupt_split, "nocol": nocol, "seg": seg, "rand": rand, "rand_side": rand_side,
              "vlm": vlm, "taken": taken, "notlvit": notlvit, "afile": afile,
              "image": manifest.parent / "images" / "phantom_0000.png",
              "mask": manifest.parent / "masks" / "phantom_0000.png", **extra}
    return {k: str(v) for k, v in values.items()} | {"root": str(root)}


def _issue17_inputs(root: Path, manifest: Path) -> dict[str, object]:
    """Inputs of the issue-17 cases: masks with alpha, a leaking manifest, pickle-only HF folders, files whose
    header declares 20000x20000 pixels (a few hundred bytes each), YAML configs out of range, a 1x1 image."""
    import gzip
    import shutil
    import struct
    import zlib

    import nibabel as nib
    from transformers import ViTConfig

    from dusss.data.caption import caption_mask
    from dusss.data.readers import read_mask
    from dusss.models.text_encoders import TextEncoderConfig, model_folder

    out: dict[str, object] = {}
    lesion = next(m for m in (read_mask(p) for p in sorted((manifest.parent / "masks").glob("*.png"))) if m.any())
    out["alpha_caption"] = caption_mask(lesion)
    out["alpha_mask"] = _png(root / "alpha.png", np.dstack([np.zeros((*lesion.shape, 3)), lesion * 255]).astype(np.uint8))
    shifted = np.roll(lesion, lesion.shape[1] // 2, axis=1)
    out["ambiguous_mask"] = _png(root / "ambiguous.png", np.dstack([lesion, lesion, lesion, shifted]).astype(np.uint8) * 255)

    rows = list(csv.reader(manifest.open()))
    train = next(i for i, r in enumerate(rows) if i and r[3] == "train")
    test = next(i for i, r in enumerate(rows) if i and r[3] == "test")
    rows[1], rows[train] = rows[train], rows[1]  # the leaking train row is row 2
    rows[test][4] = rows[1][4]
    out["leak_case"] = rows[1][4]
    out["leak"] = manifest.parent / "leak.csv"
    with Path(out["leak"]).open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)

    bin_vit = root / "bin_vit"
    ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32).save_pretrained(bin_vit)
    bin_bert = root / "bin_bert"
    bin_bert.mkdir()
    for f in model_folder(TextEncoderConfig()).iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, bin_bert / f.name)
    for folder in (bin_vit, bin_bert):
        (folder / "pytorch_model.bin").write_bytes(b"never unpickled")  # a pickle would run code on load
    out["bin_vit"], out["bin_bert"] = bin_vit, bin_bert

    png = bytearray(_png(root / "bomb.png", np.zeros((1, 1), np.uint8)).read_bytes())
    struct.pack_into(">II", png, 16, 20000, 20000)  # IHDR width, height
    struct.pack_into(">I", png, 29, zlib.crc32(bytes(png[12:29])))
    (root / "bomb.png").write_bytes(bytes(png))
    out["bomb_png"] = root / "bomb.png"
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.uint8), np.eye(4)), str(root / "small.nii"))
    nii = bytearray((root / "small.nii").read_bytes())
    struct.pack_into("<8h", nii, 40, 2, 20000, 20000, 1, 1, 1, 1, 1)  # dim[0..7]
    out["bomb_nii"] = root / "bomb.nii.gz"
    Path(out["bomb_nii"]).write_bytes(gzip.compress(bytes(nii)))

    out["yaml_wd"] = root / "wd.yaml"
    Path(out["yaml_wd"]).write_text("weight_decay: -1\n")
    out["yaml_warmup"] = root / "warmup.yaml"
    Path(out["yaml_warmup"]).write_text("warmup_fraction: 5\n")
    out["one_px"] = _png(root / "one_px.png", np.full((1, 1), 128, np.uint8))
    return out


# what the forked runner imports before its first fork: every module a command imports on its way
PRELOAD = ["torch", "transformers", "dusss.data.lvit", "dusss.data.verify", "dusss.data.synth", "dusss.demo",
           "dusss.engine.evaluate", "dusss.engine.export", "dusss.engine.predict", "dusss.engine.pretrain",
           "dusss.engine.train", "dusss.report.textmap"]
# cases also run through the console script itself, whose results must be the forked runner's
CONSOLE_CHECKED = ["synth/n-too-small", "split/no-out", "caption/corrupt-png", "train/corrupt-image"]
RESULT = tuple[int, str, str, float, dict[str, str]]


def _thread_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    return env


def _case_values(world: dict[str, str], case: str, under: str) -> dict[str, str]:
    tmp = Path(world["root"]) / under / case.replace("/", "__")
    tmp.mkdir(parents=True)
    return world | {"tmp": str(tmp)}


@pytest.fixture(scope="module")
def results(world: dict[str, str]) -> dict[str, RESULT]:
    """Every case as its own process: children forked one after another from one interpreter that has imported
    the CLI (`dusss.testing.run_cli_forked`), so the sweep pays `import torch` once, not 52 times."""
    values = {case: _case_values(world, case, "cases") for case in CASES}
    jobs = [([a.format(**values[case]) for a in CASES[case][0]], values[case]["tmp"]) for case in CASES]
    runner = ("import json, sys; from dusss.testing import run_cli_forked; "
              "json.dump(run_cli_forked(json.load(sys.stdin), preload=json.loads(sys.argv[1])), sys.stdout)")
    proc = subprocess.run([sys.executable, "-c", runner, json.dumps(PRELOAD)], input=json.dumps(jobs),
                          env=_thread_env(), capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr
    return {case: (*res, values[case]) for case, res in zip(CASES, json.loads(proc.stdout))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_a_non_zero_exit(results: dict[str, RESULT], case: str) -> None:
    code, out, err, _, values = results[case]
    _, kind, fragment, absent = CASES[case]
    fragment = fragment.format(**values)
    if kind == OK:  # processed: exit 0, the fragment on stdout, the output written
        assert code == 0 and fragment in out and "Traceback" not in err, (code, out, err)
        assert absent is None or Path(absent.format(**values)).is_file()
        return
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


@pytest.mark.parametrize("case", CONSOLE_CHECKED)
def test_the_console_script_gives_what_the_forked_runner_gives(world: dict[str, str], results: dict[str, RESULT],
                                                               case: str) -> None:
    values = _case_values(world, case, "console")
    proc = subprocess.run([*_dusss(), *[a.format(**values) for a in CASES[case][0]]], env=_thread_env(),
                          capture_output=True, text=True, timeout=300, cwd=values["tmp"], check=False)
    code, out, err, _, forked = results[case]
    assert proc.returncode == code
    assert proc.stdout.replace(values["tmp"], "TMP") == out.replace(forked["tmp"], "TMP")
    assert proc.stderr.replace(values["tmp"], "TMP") == err.replace(forked["tmp"], "TMP")


def test_the_sweep_reports_its_count(capsys: pytest.CaptureFixture[str]) -> None:
    kinds = {k: sum(1 for c in CASES.values() if c[1] == k) for k in (ERROR, USAGE, REPORT, OK)}
    with capsys.disabled():
        print(f"\nerror sweep: {len(CASES)} cases ({', '.join(f'{v} {k}' for k, v in kinds.items())})")
    assert len(CASES) == EXPECTED_CASES
