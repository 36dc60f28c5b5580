"""Export the student U-Net of a `dusss train` run to ONNX or TorchScript, with a JSON of its preprocessing.

`export_model(run_or_checkpoint, "onnx" | "torchscript", out_file)` writes `out_file` and, beside it,
`<out_file>.json` (e.g. `model.onnx.json`) that says how to feed the network and read its output: the
input is `float32 [N, 3, S, S]` (NCHW, RGB in [0, 1], S = the training `image_size`, resized bilinearly,
no mean/std normalisation: the U-Net takes [0, 1] directly); the output is logits, probability =
sigmoid(logits), mask = probability >= threshold. Only the batch axis is dynamic; height and width are
fixed at S (the U-Net's pad-to-a-multiple-of-16 branch is resolved at trace time).

ONNX goes through torch's current exporter (`torch.onnx.export(..., dynamo=True)`: torch.export, then
onnxscript; `pip install "dusss[export]"` brings `onnxscript`), with the batch axis a `torch.export.Dim`.
Without `onnxscript` installed it falls back to the deprecated TorchScript-based exporter (`dynamo=False`,
torch alone); the JSON's `exporter` field says which one wrote the file. TorchScript files come from `torch.jit.trace`
and `torch.jit.save`: a TorchScript archive, read back by `torch.jit.load`'s own deserializer, not by
Python's pickle of arbitrary objects; the weights are read through safetensors as everywhere in dusss.

Both files are written atomically (temp file + rename), the model first and the JSON last, so a JSON
always describes a complete model file. Neither may be the source checkpoint or its sidecar (refused even
with `overwrite`), and an existing file is replaced only with `overwrite` (`dusss.outputs.check_outputs`).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from dusss import __version__
from dusss.atomic import atomic_write_bytes, atomic_write_text
from dusss.checkpoint import sidecar_path
from dusss.errors import CheckpointError, ConfigError
from dusss.outputs import check_outputs
from dusss.runfiles import run_file

FORMATS = ("onnx", "torchscript")
EXPORT_FORMAT = "dusss-export-v1"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
ONNX_EXPORTER = "torch.onnx.export (torch.export-based exporter, dynamo=True)"
ONNX_LEGACY_EXPORTER = "torch.onnx.export (TorchScript-based exporter, dynamo=False; onnxscript not installed)"
TORCHSCRIPT_EXPORTER = "torch.jit.trace + torch.jit.save"


def _opset_range() -> tuple[int, int]:
    """Opsets the TorchScript-based ONNX exporter of the installed torch accepts."""
    try:
        from torch.onnx import _constants as c

        return int(c.ONNX_MIN_OPSET), int(getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", c.ONNX_MAX_OPSET))
    except (ImportError, AttributeError):  # private module moved: fall back to a conservative range
        return 9, 17


def sidecar_for(out_file: str | Path) -> Path:
    """`model.onnx` -> `model.onnx.json` (the preprocessing description written beside an export)."""
    out_file = Path(out_file)
    return out_file.with_name(out_file.name + ".json")


def _check_args(fmt: str, out_file: Path, opset: int) -> str:
    """Validate the user's choices before any work; returns the normalised format."""
    fmt_n = str(fmt).strip().lower()
    if fmt_n not in FORMATS:
        raise ConfigError(f"export format must be one of {'|'.join(FORMATS)}, got {fmt!r}")
    if fmt_n == "onnx":
        lo, hi = _opset_range()
        if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
            raise ConfigError(f"opset must be an integer in [{lo}, {hi}] for this torch's ONNX exporter, got {opset!r}")
    if out_file.is_dir():
        raise ConfigError(f"{out_file}: is a folder; --out must be a file path (e.g. model.onnx)")
    if out_file.name.endswith(".json"):
        raise ConfigError(f"{out_file}: the export must not be a .json file (its JSON description goes beside it)")
    return fmt_n


def _image_size(meta: dict[str, Any], path: Path) -> int:
    """The training image size from the checkpoint's sidecar (the exported network's fixed H = W)."""
    size = meta.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CheckpointError(f"{path}: sidecar has no valid 'image_size' (got {size!r}); cannot fix the input size")
    return size


def _threshold(meta: dict[str, Any], path: Path) -> float:
    """The decision threshold from the sidecar (0.5 when absent, as `dusss predict` does)."""
    thr = meta.get("threshold", 0.5)
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 < float(thr) < 1.0:
        raise CheckpointError(f"{path}: sidecar 'threshold' must be a number in (0, 1), got {thr!r}")
    return float(thr)


def _has_onnxscript() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxscript") is not None


def _onnx_bytes(model: torch.nn.Module, example: torch.Tensor, opset: int) -> tuple[bytes, str]:
    """Serialise `model` to ONNX in memory, with a dynamic batch axis on input and output; returns the bytes and
    the exporter that wrote them (the torch.export-based one, or the legacy one without onnxscript)."""
    if _has_onnxscript():
        import logging

        # torch.export specialises a size-1 axis to a constant, so the traced example has two images
        example = example.expand(2, *example.shape[1:]).contiguous()
        batch = torch.export.Dim("batch", min=1)
        quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
        levels = [lg.level for lg in quiet]
        try:
            for lg in quiet:  # the exporter logs its progress and the opset conversion; not the user's concern
                lg.setLevel(logging.ERROR)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                            output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                                            opset_version=opset, optimize=True, verbose=False)
        finally:
            for lg, level in zip(quiet, levels, strict=True):
                lg.setLevel(level)
        return program.model_proto.SerializeToString(), ONNX_EXPORTER
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter announces its own deprecation, and tracing warns about the U-Net's
        # shape-dependent padding branch, which is constant for the fixed input size; neither concerns the user.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            buf,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buf.getvalue(), ONNX_LEGACY_EXPORTER


def _torchscript_bytes(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    """Trace `model` and serialise it as a TorchScript archive in memory."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, buf)  # deprecated in favour of torch.export since torch 2.13, still supported
    return buf.getvalue()


def describe_export(meta: dict[str, Any], source: Path, fmt: str, out_file: Path, opset: int | None,
                    image_size: int, threshold: float, in_channels: int, n_classes: int,
                    exporter: str | None = None) -> dict[str, Any]:
    """The JSON written beside an export: how to preprocess an image and read the network's output."""
    colour = "RGB" if in_channels == 3 else f"{in_channels} channels"
    return {
        "format": EXPORT_FORMAT,
        "model_format": fmt,
        "file": out_file.name,
        "exporter": exporter or (ONNX_EXPORTER if fmt == "onnx" else TORCHSCRIPT_EXPORTER),
        "opset": opset,
        "image_size": image_size,
        "threshold": threshold,
        "method": meta.get("method"),
        "source_checkpoint": str(source.resolve()),
        "source_epoch": meta.get("epoch"),
        "source_val_dice": meta.get("val_dice"),
        "unet": meta.get("unet"),
        "dusss_version": __version__,
        "torch_version": torch.__version__,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", in_channels, image_size, image_size],
            "dtype": "float32",
            "layout": "NCHW",
            "colour": colour,
            "range": [0.0, 1.0],
            "resize": {"size": [image_size, image_size], "interpolation": "bilinear", "align_corners": False},
            "normalisation": None,
            "notes": "gray images repeated to 3 channels, alpha dropped; values scaled to [0, 1] by the "
                     "image's bit depth; no mean/std normalisation (the U-Net takes [0, 1] directly)",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", n_classes, image_size, image_size],
            "dtype": "float32",
            "kind": "logits",
            "probability": "sigmoid",
            "mask": "sigmoid(logits) >= threshold",
            "notes": "dusss predict resizes the logits back to the image's own size (bilinear) before the sigmoid",
        },
    }


def export_model(model_path: str | Path, fmt: str, out_file: str | Path, opset: int = 17,
                 overwrite: bool = False) -> Path:
    """Export the student U-Net of `model_path` (a `dusss train` run folder or its model.safetensors).

    `fmt` is "onnx" (opset `opset`, dynamic batch axis) or "torchscript" (traced). Writes `out_file`
    (its folder is created) and `<out_file>.json` describing the preprocessing; returns `out_file`.
    Raises ConfigError for a bad format/opset/output path, CheckpointError for a missing, foreign or
    wrong-kind checkpoint, and DusssError for an output that is the checkpoint (or its sidecar) or that
    exists without `overwrite` (all one-line messages).
    """
    from dusss.engine.train import load_segmentation_model
    from dusss.models.networks import needs_text

    out_file = Path(out_file)
    fmt_n = _check_args(fmt, out_file, opset)
    source = run_file(model_path)  # a run folder -> its model.safetensors
    check_outputs([out_file, sidecar_for(out_file)],
                  inputs=[("--model", source), ("--model's sidecar", sidecar_path(source))], overwrite=overwrite)
    model, meta = load_segmentation_model(model_path, "cpu")
    if needs_text(model):
        raise ConfigError(f"{source}: a {meta.get('network')!r} network (method {meta.get('method')!r}) needs each "
                          "image's report and its frozen text encoder at inference; export writes image-only "
                          "networks (the U-Net students of every other method)")
    image_size = _image_size(meta, source)
    threshold = _threshold(meta, source)
    cfg = model.cfg
    example = torch.rand(1, cfg.in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        data, exporter = (_onnx_bytes(model, example, opset) if fmt_n == "onnx"
                          else (_torchscript_bytes(model, example), TORCHSCRIPT_EXPORTER))
    description = describe_export(meta, source, fmt_n, out_file, opset if fmt_n == "onnx" else None,
                                  image_size, threshold, cfg.in_channels, cfg.n_classes, exporter)
    atomic_write_bytes(out_file, data)  # creates the folder
    atomic_write_text(sidecar_for(out_file), json.dumps(description, indent=2) + "\n")
    return out_file
