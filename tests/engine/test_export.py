"""Export of the student U-Net: ONNX (onnxruntime) and TorchScript outputs match PyTorch; the JSON sidecar."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dusss import __version__
from dusss.checkpoint import save_checkpoint
from dusss.engine.export import export_model, sidecar_for
from dusss.errors import CheckpointError, ConfigError
from dusss.models.unet import UNet, UNetConfig

SIZE = 64
ATOL = 1e-4


def _trained_like_unet() -> UNet:
    """A small U-Net in eval mode whose BatchNorm statistics are not the identity (so eval mode matters)."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_width=8))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return model.eval()


def _save_run(run: Path, model: UNet, kind: str = "segmentation", **meta_extra: object) -> Path:
    meta = {"unet": dataclasses.asdict(model.cfg), "image_size": SIZE, "threshold": 0.4, "method": "supervised",
            "epoch": 3, "val_dice": 0.5, **meta_extra}
    path = run / "model.safetensors"
    save_checkpoint(path, model.state_dict(), kind, meta)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("export")
    model = _trained_like_unet()
    run = root / "run"
    _save_run(run, model)
    onnx_file = export_model(run, "onnx", root / "out" / "new" / "unet.onnx")
    ts_file = export_model(run / "model.safetensors", "torchscript", root / "out" / "unet.pt")
    return {"model": model, "run": run, "onnx": onnx_file, "ts": ts_file, "root": root}


def _images(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _reference(model: UNet, x: torch.Tensor) -> np.ndarray:
    return model(x).numpy()


def test_onnx_matches_pytorch_for_several_batch_sizes(setup: dict) -> None:
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(setup["onnx"]), opts, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    for batch, seed in ((1, 1), (3, 2), (5, 3)):  # traced with batch 1
        x = _images(batch, seed)
        (got,) = sess.run(None, {"image": x.numpy()})
        want = _reference(setup["model"], x)
        assert got.shape == (batch, 1, SIZE, SIZE)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-4)


def test_onnx_graph_is_valid_with_dynamic_batch_only(setup: dict) -> None:
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(setup["onnx"]))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and not dims[0].dim_value
    assert [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_without_onnxscript_the_legacy_exporter_writes_the_same_network(
        setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ort = pytest.importorskip("onnxruntime")
    from dusss.engine import export

    monkeypatch.setattr(export, "_has_onnxscript", lambda: False)
    out = export_model(setup["run"], "onnx", tmp_path / "legacy.onnx")
    assert "dynamo=False" in json.loads(sidecar_for(out).read_text())["exporter"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = _images(batch, seed=10 + batch)
        got = sess.run(None, {"image": x.numpy()})[0]
        np.testing.assert_allclose(got, _reference(setup["model"], x), atol=ATOL, rtol=1e-4)


def test_torchscript_matches_pytorch_for_several_batch_sizes(setup: dict) -> None:
    loaded = torch.jit.load(str(setup["ts"]), map_location="cpu")
    for batch, seed in ((1, 4), (4, 5)):
        x = _images(batch, seed)
        with torch.no_grad():
            got = loaded(x).numpy()
        np.testing.assert_allclose(got, _reference(setup["model"], x), atol=ATOL, rtol=1e-4)


def test_sidecar_describes_preprocessing(setup: dict) -> None:
    side = sidecar_for(setup["onnx"])
    assert side.name == "unet.onnx.json"
    info = json.loads(side.read_text())
    assert info["model_format"] == "onnx" and info["file"] == "unet.onnx" and info["opset"] == 17
    assert "dynamo=True" in info["exporter"]  # torch's current exporter (onnxscript is in the export extra)
    assert info["image_size"] == SIZE and info["threshold"] == 0.4 and info["method"] == "supervised"
    assert info["source_checkpoint"] == str((setup["run"] / "model.safetensors").resolve())
    assert info["dusss_version"] == __version__
    assert info["source_epoch"] == 3 and info["unet"]["base_width"] == 8
    inp, out = info["input"], info["output"]
    assert inp["name"] == "image" and inp["shape"] == ["batch", 3, SIZE, SIZE]
    assert inp["dtype"] == "float32" and inp["layout"] == "NCHW" and inp["colour"] == "RGB"
    assert inp["range"] == [0.0, 1.0] and inp["normalisation"] is None
    assert inp["resize"]["interpolation"] == "bilinear" and inp["resize"]["size"] == [SIZE, SIZE]
    assert out["name"] == "logits" and out["kind"] == "logits" and out["probability"] == "sigmoid"
    assert out["shape"] == ["batch", 1, SIZE, SIZE]

    ts = json.loads(sidecar_for(setup["ts"]).read_text())
    assert ts["model_format"] == "torchscript" and ts["opset"] is None and ts["file"] == "unet.pt"


def test_out_folder_created_and_no_temp_files_left(setup: dict) -> None:
    out = setup["root"] / "out"
    assert sorted(p.name for p in (out / "new").iterdir()) == ["unet.onnx", "unet.onnx.json"]
    assert sorted(p.name for p in out.iterdir()) == ["new", "unet.pt", "unet.pt.json"]


def test_bad_arguments_are_config_errors(setup: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="format"):
        export_model(setup["run"], "tflite", tmp_path / "m.tflite")
    with pytest.raises(ConfigError, match="opset"):
        export_model(setup["run"], "onnx", tmp_path / "m.onnx", opset=3)
    with pytest.raises(ConfigError, match="is a folder"):
        export_model(setup["run"], "onnx", tmp_path)
    with pytest.raises(ConfigError, match="json"):
        export_model(setup["run"], "onnx", tmp_path / "m.json")
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoints_are_checkpoint_errors(tmp_path: Path) -> None:
    model = UNet(UNetConfig(base_width=4))
    _save_run(tmp_path / "vlm", model, kind="vlm")
    with pytest.raises(CheckpointError, match="'vlm' checkpoint"):
        export_model(tmp_path / "vlm", "onnx", tmp_path / "a.onnx")
    with pytest.raises(CheckpointError, match="not found"):
        export_model(tmp_path / "missing.safetensors", "torchscript", tmp_path / "a.pt")
    _save_run(tmp_path / "nosize", model, image_size=None)
    with pytest.raises(CheckpointError, match="image_size"):
        export_model(tmp_path / "nosize", "onnx", tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "a.pt").exists()
