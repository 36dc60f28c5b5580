"""The loop skeleton both stages share: micro-batches become optimizer steps (accumulation: the mean of the
micro-batch gradients), the schedule is set per step, `after_step` sees each step once, and the logged sums
cover every micro-batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dusss.engine.loop import Stepper


def test_accumulated_steps_equal_one_step_on_the_mean_gradient(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1, bias=False)
    ref = torch.nn.Linear(3, 1, bias=False)
    ref.load_state_dict(lin.state_dict())
    xs = [torch.randn(4, 3) for _ in range(5)]  # 5 micro-batches, accum 2: 2 steps, the 5th is left over
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    seen: list[int] = []
    stepper = Stepper(opt, torch.amp.GradScaler("cpu", enabled=False), accum=2, total_steps=2, warmup=0,
                      device=torch.device("cpu"), precision="fp32", last_good=tmp_path / "none",
                      after_step=seen.append)
    step, sums, counts, _ = stepper.epoch(xs, 4, 0, lambda x, at: ((lin(x) ** 2).mean(), {"at": float(at)}),
                                          "test", False)
    assert step == 2 and seen == [0, 1]
    assert counts == {"loss": 4, "at": 4} and sums["at"] == 0 + 0 + 1 + 1  # the step each micro-batch saw
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for at, pair in enumerate((xs[:2], xs[2:4])):
        ref_opt.zero_grad()
        sum((ref(x) ** 2).mean() for x in pair).div(2).backward()
        for g in ref_opt.param_groups:  # the cosine schedule: full lr at step 0, 0.01 + 0.99 / 2 of it at step 1
            g["lr"] = 0.1 * (1.0 if at == 0 else 0.505)
        ref_opt.step()
    torch.testing.assert_close(lin.weight, ref.weight)
    row = stepper.train_row(sums, counts, 2.0, images=16)
    assert row["train/at"] == pytest.approx(0.5) and row["images_per_s"] == 8.0 and row["lr"] == pytest.approx(0.0505)


def test_close_epoch_logs_then_saves_the_resume_point_that_open_log_restores(tmp_path: Path) -> None:
    from dusss.engine.logging import read_metrics
    from dusss.engine.loop import close_epoch, open_log
    from dusss.runfiles import RunFiles

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    files = RunFiles(tmp_path)
    logger, meta = open_log(tmp_path, False, files.state, {"lin": lin}, {}, opt, scaler)
    assert meta == {"epoch": 0, "step": 0} and logger is not None  # a fresh run
    for epoch in (1, 2, 3):
        close_epoch(logger, files, 4 * epoch, epoch, {"train/loss": 1.0 / epoch}, 2, lambda: {"lin": lin.state_dict()},
                    opt, scaler, {"best_dice": 0.5})
        if epoch == 2:
            saved = {k: v.clone() for k, v in lin.state_dict().items()}
            with torch.no_grad():
                lin.weight.add_(1.0)  # epoch 3 moves the weights; its row is logged, its state then saved
    logger.close()
    assert files.curves.is_file()  # drawn at epoch 2 (curves_every 2)
    assert [r["epoch"] for r in read_metrics(files.metrics)] == [1, 2, 3]
    fresh = torch.nn.Linear(3, 1)
    logger2, meta2 = open_log(tmp_path, True, files.state, {"lin": fresh}, {}, opt, scaler)
    assert (meta2["epoch"], meta2["step"], meta2["best_dice"]) == (3, 12, 0.5)
    torch.testing.assert_close(fresh.weight, saved["weight"] + 1.0)  # the last saved state, epoch 3's
    assert logger2 is not None
    logger2.close()
    assert [r["epoch"] for r in read_metrics(files.metrics)] == [1, 2, 3]  # nothing after the resume point to drop
