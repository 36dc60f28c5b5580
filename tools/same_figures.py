"""Same seed, same data -> same figures: tiny CPU runs whose metrics and weights are written as ROOT/ref.json.

    python tools/same_figures.py /tmp/before     # on one revision
    python tools/same_figures.py /tmp/after      # on another
    cmp /tmp/before/ref.json /tmp/after/ref.json  # identical files: the change did not move a number

A 2-epoch DuSSS pre-training (grad_accum 2) of a tiny random VLM on 32 phantoms, then supervised, mt (grad_accum
2) and dusss for 3 epochs each on a 50 % split: every logged train / val / pseudo value per epoch and a SHA-256 of
each final model's tensors. About 40 s on one thread. Used for issue 16's loop refactor (bit-identical).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _digest(path: Path) -> str:
    from safetensors.torch import load_file

    tensors = sorted(load_file(str(path)).items())
    return hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in tensors)).hexdigest()


def main(root: Path) -> dict[str, Any]:
    import torch

    from dusss.data.manifest import read_manifest
    from dusss.data.splits import make_split, save_split
    from dusss.data.synth import generate_phantoms
    from dusss.engine.pretrain import PretrainConfig, run_pretrain
    from dusss.engine.train import load_train_config, run_train
    from dusss.models.image_encoders import ImageEncoderConfig
    from dusss.models.text_encoders import TextEncoderConfig
    from dusss.models.vlm import VLMConfig

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    manifest = generate_phantoms(root / "ph", n=32, size=32, seed=0, overwrite=True)
    save_split(make_split(read_manifest(manifest), 0.5, seed=0), root / "split.json", overwrite=True)
    vlm = VLMConfig(image=ImageEncoderConfig(image_size=32, hidden_size=16, num_layers=1, num_heads=2),
                    text=TextEncoderConfig(random_init=True, num_layers=1, hidden_size=16, num_heads=2,
                                           intermediate_size=32),
                    embed_dim=8, head_hidden=16, pdt_heads=2)
    ckpt = run_pretrain(PretrainConfig(data=str(manifest), out=str(root / "vlm"), method="dusss", epochs=2,
                                       batch_size=4, image_size=32, grad_accum=2, seed=0, progress=False, vlm=vlm),
                        overwrite=True)
    out: dict[str, Any] = {}
    for method, accum in (("supervised", 1), ("mt", 2), ("dusss", 1)):
        cfg = load_train_config(None, {"data": str(manifest), "splits": str(root / "split.json"),
                                       "out": str(root / method), "method": method, "vlm": str(ckpt), "epochs": 3,
                                       "batch_size": 2, "image_size": 32, "unet.base_width": 4, "seed": 0,
                                       "grad_accum": accum, "progress": False, "semi.text_warmup_steps": 3})
        run = run_train(cfg, overwrite=True)
        rows = _rows(run / "metrics.jsonl")
        keys = sorted(k for k in rows[-1] if k.startswith(("train/", "val/", "pseudo/")))
        out[method] = {"keys": keys, "rows": [[r.get(k) for k in keys] for r in rows],
                       "weights": _digest(run / "last.safetensors")}
    out["pretrain"] = {"loss": [r["train/loss"] for r in _rows(root / "vlm" / "metrics.jsonl")],
                       "weights": _digest(ckpt)}
    (root / "ref.json").write_text(json.dumps(out, indent=1, sort_keys=True))
    return out


if __name__ == "__main__":
    result = main(Path(sys.argv[1]))
    print(json.dumps({k: v["weights"][:12] for k, v in result.items()}))
