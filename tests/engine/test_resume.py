"""Crash-safe training: a real `dusss train` process killed with SIGKILL resumes to the same run.

The killed processes run the real CLI (`dusss.cli.main`) in a child interpreter whose `after_step` is
wrapped to report the optimizer step to a file and sleep a little, so that the test can kill it at a
chosen moment (mid-epoch, or between an epoch's metrics row and its resume point). The resumes run the
installed console script itself. The in-process test checks that an interrupted-then-resumed run is the
same run as an uninterrupted one (same losses, same val Dice, same weights, on CPU with the same seed):
every random draw is either re-derived from (seed, epoch) (samplers, augmentations) or restored from the
checkpoint (global torch/NumPy/Python RNG states, optimizer, EMA teacher, early-stopping state).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dusss.checkpoint import load_checkpoint
from dusss.cli import main
from dusss.engine.train import TrainConfig, load_segmentation_model, run_train
from dusss.methods.perturb import PerturbConfig
from dusss.methods.segmentation import SEG_METHODS, SegMethodConfig
from dusss.models.unet import UNetConfig

pytestmark = pytest.mark.slow(seconds=25)  # about this long at one thread (tests/conftest.py runs it early)

EPOCHS = 4
STEPS_PER_EPOCH = 4  # 7 labeled / 7 unlabeled rows (n=24, labeled 0.5), batch 2

# The real CLI in a child interpreter, paced: after each optimizer step it writes the number of steps
# done to argv[1] and sleeps, so the parent can SIGKILL it at a known point.
PACED = """
import sys, time
from pathlib import Path
from dusss.methods.segmentation import SEG_METHODS
report = Path(sys.argv[1])
cls = SEG_METHODS["mt"]
original = cls.after_step
def paced(self, step):
    original(self, step)
    report.write_text(str(step + 1))
    time.sleep(0.04)
cls.after_step = paced
from dusss.cli import main
main(sys.argv[2:])
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _dusss() -> list[str]:
    script = Path(sys.executable).with_name("dusss")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dusss"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, phantom_split) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    return phantom_split(root)


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _state_epoch(run: Path) -> int | None:
    path = run / "state.json"
    return int(json.loads(path.read_text())["epoch"]) if path.exists() else None


def _wait(proc: subprocess.Popen, cond, what: str, timeout: float = 90.0) -> None:  # type: ignore[type-arg]
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"train exited (rc {proc.returncode}) before {what}: {err[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def _kill(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_sigkilled_train_resumes_to_the_same_epoch_count(data: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    manifest, split = data
    run, steps = tmp_path / "run", tmp_path / "steps.txt"
    args = ["train", "--data", str(manifest), "--splits", str(split), "--out", str(run), "--method", "mt",
            "--epochs", str(EPOCHS), "--batch-size", "2", "--width", "4", "--image-size", "32", "--lr", "0.01",
            "--device", "cpu", "--seed", "0", "--quiet"]

    # 1. SIGKILL in the middle of epoch 2 (epoch 1's state is on disk)
    proc = subprocess.Popen([sys.executable, "-c", PACED, str(steps), *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def mid_epoch_2() -> bool:
        text = steps.read_text().strip() if steps.exists() else ""
        return _state_epoch(run) == 1 and text.isdigit() and int(text) >= STEPS_PER_EPOCH + 2

    _wait(proc, mid_epoch_2, "the middle of epoch 2")
    _kill(proc)
    assert _state_epoch(run) == 1 and not (run / "DONE").exists()
    assert [r["epoch"] for r in _rows(run)] == [1]

    # 2. resume with the real console script: completes, epochs 1..N once each, finite losses
    res = subprocess.run([*_dusss(), *args, "--resume"], env=_env(), capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    assert [r["step"] for r in rows] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    assert _state_epoch(run) == EPOCHS and (run / "DONE").exists()
    model, meta = load_segmentation_model(run)
    assert 1 <= meta["epoch"] <= EPOCHS
    assert torch.isfinite(model(torch.rand(1, 3, 32, 32))).all()
    history = [h["event"] for h in json.loads((run / "run.json").read_text())["history"]]
    assert history == ["created", "resumed"]

    # 3. resuming a finished run (same CLI, in-process to save a start-up) is harmless: nothing is
    #    trained, weights and metrics are untouched
    before = {name: (run / name).read_bytes() for name in
              ("model.safetensors", "last.safetensors", "state.safetensors", "metrics.jsonl")}
    main([*args, "--resume"])
    assert "best model:" in capsys.readouterr().out
    assert {name: (run / name).read_bytes() for name in before} == before


def _config(data: tuple[Path, Path], out: Path, epochs: int = EPOCHS) -> TrainConfig:
    manifest, split = data
    return TrainConfig(data=str(manifest), splits=str(split), out=str(out), method="mt", epochs=epochs,
                       batch_size=2, image_size=32, lr=0.01, device="cpu", seed=3, progress=False,
                       unet=UNetConfig(base_width=4), semi=SegMethodConfig(perturb=PerturbConfig(teacher_noise=0.1)))


class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def straight(data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run (teacher_noise > 0, so the global torch RNG matters too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dusss.engine.loop.plot_curves", lambda *a, **k: None)  # speed only
        return run_train(_config(data, tmp_path_factory.mktemp("straight") / "run"))


@pytest.mark.parametrize("crash", ["mid-epoch-3", "epoch-2-row-logged-state-not-saved"])
def test_interrupted_and_resumed_run_equals_uninterrupted_run(
    data: tuple[Path, Path], straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: str
) -> None:
    monkeypatch.setattr("dusss.engine.loop.plot_curves", lambda *a, **k: None)  # speed only
    out = tmp_path / "resumed"
    if crash == "mid-epoch-3":  # after 2 saved epochs, 2 optimizer steps into the third
        cls = SEG_METHODS["mt"]
        original = cls.after_step

        def crash_step(self, step: int) -> None:  # type: ignore[no-untyped-def]
            original(self, step)
            if step + 1 == 2 * STEPS_PER_EPOCH + 2:
                raise _Crash

        with monkeypatch.context() as mp:
            mp.setattr(cls, "after_step", crash_step)
            with pytest.raises(_Crash):
                run_train(_config(data, out))
        assert _state_epoch(out) == 2 and [r["epoch"] for r in _rows(out)] == [1, 2]
    else:  # killed after epoch 2's metrics row and checkpoints, before its resume point
        from dusss.engine import loop as loop_module  # where both loops write their resume point

        original_save = loop_module.save_train_state

        def crash_save(path, modules, optimizer, meta, *a, **k):  # type: ignore[no-untyped-def]
            if meta["epoch"] == 2:
                raise _Crash
            return original_save(path, modules, optimizer, meta, *a, **k)

        with monkeypatch.context() as mp:
            mp.setattr(loop_module, "save_train_state", crash_save)
            with pytest.raises(_Crash):
                run_train(_config(data, out))
        assert _state_epoch(out) == 1 and [r["epoch"] for r in _rows(out)] == [1, 2]
    resumed = run_train(_config(data, out), resume=True)

    a, b = _rows(straight), _rows(resumed)
    assert [r["epoch"] for r in b] == [r["epoch"] for r in a] == list(range(1, EPOCHS + 1))
    assert len({r["val/dice"] for r in a}) > 1  # the model does learn, so the comparison means something
    for ra, rb in zip(a, b):
        assert rb["step"] == ra["step"]
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], abs=1e-6)
        assert rb["val/dice"] == pytest.approx(ra["val/dice"], abs=1e-6)
    for name in ("last.safetensors", "model.safetensors"):
        ta, ma = load_checkpoint(straight / name, "segmentation")
        tb, mb = load_checkpoint(resumed / name, "segmentation")
        assert ma["epoch"] == mb["epoch"]
        assert max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta) <= 1e-5


def test_extending_epochs_on_resume_continues_the_run(
    data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--epochs 2`, then `--resume --epochs 4`: a recorded config change, epochs 1..4 once each.

    Not bit-equal to a straight 4-epoch run: the cosine learning rate and the consistency ramp-up are
    functions of step / total steps, and total steps grow when the epoch count does.
    """
    monkeypatch.setattr("dusss.engine.loop.plot_curves", lambda *a, **k: None)
    out = tmp_path / "ext"
    run_train(_config(data, out, epochs=2))
    with pytest.warns(UserWarning, match="changed config.*epochs: 2 -> 4"):
        run_train(_config(data, out, epochs=4), resume=True)
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    changes = json.loads((out / "run.json").read_text())["history"][-1]["config_changes"]
    assert changes == ["epochs: 2 -> 4"]
