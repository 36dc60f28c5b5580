"""Autocast, grad scaler, device resolution, channels_last, compile wrappers, threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dusss.engine.precision import (
    autocast_context,
    channels_last_input,
    make_grad_scaler,
    maybe_channels_last,
    maybe_compile,
    resolve_device,
    restore_grad_scaler,
    set_threads,
    unwrap_model,
)
from dusss.errors import ConfigError


def test_bf16_autocast_on_cpu_gives_bf16_matmul() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast_context("cpu", "bf16"):
        out = a @ b
    assert out.dtype == torch.bfloat16
    with autocast_context(torch.device("cpu"), "fp32"):
        assert (a @ b).dtype == torch.float32


def test_fp16_on_cpu_and_unknown_precision_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="fp16"):
        autocast_context("cpu", "fp16")
    with pytest.raises(ConfigError, match="fp8"):
        autocast_context("cpu", "fp8")


def test_grad_scaler_enabled_only_for_fp16_on_cuda() -> None:
    assert not make_grad_scaler("bf16", "cpu").is_enabled()
    assert not make_grad_scaler("fp16", "cpu").is_enabled()
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = make_grad_scaler("fp32", "cpu")
    before = model.weight.detach().clone()
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(before, model.weight)  # pass-through still steps


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not valid"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:1")
    else:
        with pytest.raises(ConfigError, match="visible"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, on importing dynamo
def test_channels_last_compile_unwrap_and_threads() -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    assert maybe_channels_last(conv, True) is conv
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = channels_last_input(torch.randn(1, 3, 8, 8), True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert maybe_compile(conv, False) is conv
    compiled = maybe_compile(conv, True)  # lazy: nothing compiles until called
    assert unwrap_model(compiled) is conv
    n = torch.get_num_threads()
    assert set_threads(None) == n
    try:
        assert set_threads(1) == 1
    finally:
        torch.set_num_threads(n)
    with pytest.raises(ConfigError):
        set_threads(-1)


def test_grad_scaler_state_survives_the_resume_file(tmp_path: Path) -> None:
    from dusss.engine.state import load_train_state, save_train_state

    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3, enabled=True)
    for grad in (float("inf"), 1.0, 1.0):  # overflow: scale 1024 -> 512 and the step is skipped; then 2 good steps
        opt.zero_grad()
        scaler.scale((w * grad).sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 512.0 and scaler.state_dict()["_growth_tracker"] == 2
    save_train_state(tmp_path / "s.safetensors", {}, opt, {"epoch": 1, "grad_scaler": scaler.state_dict()})
    _, _, _, meta = load_train_state(tmp_path / "s.safetensors")
    resumed = torch.amp.GradScaler("cpu", enabled=True)  # would start at 2**16
    restore_grad_scaler(resumed, meta)
    assert resumed.get_scale() == 512.0 and resumed.state_dict() == scaler.state_dict()
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    restore_grad_scaler(fresh, {"epoch": 1})  # files without the entry: unchanged
    restore_grad_scaler(fresh, {"grad_scaler": {}})  # fp32/bf16 runs save {}
    assert fresh.get_scale() == 2.0**16
    disabled = make_grad_scaler("fp32", "cpu")
    restore_grad_scaler(disabled, meta)
    assert not disabled.is_enabled() and disabled.state_dict() == {}


def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from dusss.engine import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    precision._warn_if_emulated_bf16.cache_clear()
    with pytest.warns(RuntimeWarning, match="bf16 on a CPU without native bf16 .*use --precision fp32"):
        autocast_context("cpu", "bf16")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autocast_context("cpu", "bf16")  # once per process
        autocast_context("cpu", "fp32")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    precision._warn_if_emulated_bf16.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autocast_context("cpu", "bf16")  # native bf16: nothing to say
    precision._warn_if_emulated_bf16.cache_clear()  # leave no state for the other tests
