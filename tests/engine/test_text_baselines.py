"""The text-conditioned baselines through train -> evaluate -> predict -> export -> compare: each step gives
the network the reports it needs (the manifest's, or `--text`) and says so when they are missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dusss.data.datasets import SegmentationDataset
from dusss.data.manifest import read_manifest
from dusss.data.transforms import model_input
from dusss.engine.compare import FLOPS_REPORT, forward_flops, run_compare
from dusss.engine.evaluate import evaluate_run
from dusss.engine.export import export_model
from dusss.engine.predict import predict_files
from dusss.engine.train import load_segmentation_model, load_train_config, run_train
from dusss.errors import ConfigError
from dusss.metrics import SegmentationMetrics

TINY_TEXT = {"semi.lvit.text.random_init": True, "semi.lvit.text.num_layers": 1, "semi.lvit.text.hidden_size": 16,
             "semi.lvit.text.num_heads": 2, "semi.lvit.text.intermediate_size": 32, "semi.lvit.text.dropout": 0.0}
SMALL = {"epochs": 2, "batch_size": 4, "image_size": 32, "unet.base_width": 4, "progress": False, "patience": 2,
         "device": "cpu", "semi.text_mask.skip_channels": 4}


@pytest.fixture(scope="module")
def lvit_run(tmp_path_factory: pytest.TempPathFactory, phantom_split) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lvit")
    manifest, split = phantom_split(root)
    cfg = load_train_config(None, {"data": str(manifest), "splits": str(split), "out": str(root / "run"),
                                   "method": "lvit", "seed": 0, **SMALL, **TINY_TEXT})
    torch.manual_seed(0)
    run_train(cfg)
    return root / "run", manifest


def test_lvit_run_saves_its_network_and_evaluation_feeds_the_manifest_reports(lvit_run) -> None:
    run, manifest = lvit_run
    meta = json.loads((run / "model.json").read_text())
    assert meta["network"] == "lvit" and meta["needs_text"] and meta["method"] == "lvit"
    model, _ = load_segmentation_model(run)
    # evaluation = per-image metrics of the network on the test split, each image with its own report
    test = [r for r in read_manifest(manifest) if r.split == "test" and r.mask is not None]
    ds = SegmentationDataset(test, 32)
    expected = SegmentationMetrics(threshold=0.5, compute_hd95=True)
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            prob = torch.sigmoid(model(item["image"][None], [item["text"]]))
            expected.update(prob, item["mask"][None], [item["key"]])
    result = evaluate_run(run, manifest, split="test", overwrite=True)
    assert result["dice"] == pytest.approx(expected.compute()["dice"], abs=1e-6)
    assert result["method"] == "lvit"


def test_predict_needs_the_reports_of_a_text_network(lvit_run, tmp_path: Path) -> None:
    run, manifest = lvit_run
    rows = read_manifest(manifest)[:2]
    images = [r.image for r in rows]
    with pytest.raises(ConfigError, match="needs each image's report at inference: pass --text"):
        predict_files(run, images, tmp_path / "none")
    assert not (tmp_path / "none").exists()  # nothing written
    with pytest.raises(ConfigError, match="2 reports for 3 image"):
        predict_files(run, [*images, images[0]], tmp_path / "bad", texts=["a", "b"])
    written = predict_files(run, images, tmp_path / "own", texts=[r.text for r in rows])
    model, _ = load_segmentation_model(run)
    for row, path in zip(rows, written):
        with torch.no_grad():
            z = model(model_input(np.asarray(Image.open(row.image).convert("RGB"), np.float32) / 255, 32), [row.text])
        expected = (torch.sigmoid(z)[0, 0] >= 0.5).numpy().astype(np.uint8) * 255
        assert np.array_equal(np.asarray(Image.open(path)), expected)
    one = predict_files(run, images, tmp_path / "one", texts=["No pulmonary infection."])  # one report for all
    assert len(one) == 2


def test_export_refuses_a_text_network_by_name(lvit_run, tmp_path: Path) -> None:
    run, _ = lvit_run
    with pytest.raises(ConfigError, match="'lvit' network .* needs each image's report"):
        export_model(run, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_flops_of_a_text_network_count_its_text_encoder(lvit_run) -> None:
    run, _ = lvit_run
    model, _ = load_segmentation_model(run)
    with_text = forward_flops(model, 32)
    unet_only = forward_flops(model.unet, 32)
    assert with_text > unet_only > 0
    assert forward_flops(model, 32, text=FLOPS_REPORT + " " + FLOPS_REPORT) > with_text  # a longer report


def test_compare_runs_clip_and_lvit_and_counts_their_frozen_encoders(tmp_path: Path, phantom_split,
                                                                     tiny_vlm_checkpoint) -> None:
    manifest, _ = phantom_split(tmp_path)
    vlm_overrides = {"epochs": 1, "batch_size": 8, "image_size": 32, "vlm.image.image_size": 32,
                     "vlm.image.hidden_size": 16, "vlm.image.num_layers": 1, "vlm.image.num_heads": 2,
                     "vlm.text.random_init": True, "vlm.text.num_layers": 1, "vlm.text.hidden_size": 16,
                     "vlm.text.num_heads": 2, "vlm.text.intermediate_size": 32, "vlm.embed_dim": 8,
                     "vlm.head_hidden": 16, "vlm.pdt_heads": 2, "device": "cpu", "progress": False}
    table = run_compare(manifest, ["supervised", "clip", "lvit"], [1.0], [0], tmp_path / "cmp",
                        overrides={**SMALL, **TINY_TEXT, "epochs": 1, "patience": 1},
                        pretrain_overrides=vlm_overrides, progress=False)
    rows = {r["method"]: r for r in table["rows"]}
    assert (tmp_path / "cmp" / "vlm_clip_s0" / "vlm.safetensors").is_file()  # CLIP's objective, once per seed
    clip_model, clip_meta = load_segmentation_model(tmp_path / "cmp" / "runs" / "clip_l100_s0")
    assert clip_meta["network"] == "clip" and clip_meta["vlm"].endswith("vlm_clip_s0/vlm.safetensors")
    # the inference network's parameters: the frozen VLM / text encoder included
    assert rows["clip"]["parameters"] == sum(p.numel() for p in clip_model.parameters())
    assert rows["clip"]["parameters"] > sum(p.numel() for p in clip_model.parameters() if p.requires_grad)
    lvit_model, _ = load_segmentation_model(tmp_path / "cmp" / "runs" / "lvit_l100_s0")
    assert rows["lvit"]["parameters"] == sum(p.numel() for p in lvit_model.parameters())
    assert rows["lvit"]["parameters"] > rows["supervised"]["parameters"]
    assert all(0.0 <= r["dice"] <= 1.0 and r["flops"] > 0 for r in rows.values())
    assert "lvit" in (tmp_path / "cmp" / "table.md").read_text()
