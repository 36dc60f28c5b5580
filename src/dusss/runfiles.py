"""The names of a run folder's files, in one place: `RunFiles(run).model` instead of `run / "model.safetensors"`
scattered over the loops, the inference commands and the report.

| name | written by | what |
|---|---|---|
| model.safetensors (+ .json) | train | the best-val student U-Net |
| last.safetensors | train | the student after the last epoch |
| state.safetensors | pretrain, train | the resume point (modules, optimizer, RNG, counters) |
| vlm.safetensors | pretrain | the pre-trained VLM |
| text_mask.safetensors | train (dusss, amvlm) | the trained text-mask generator, for `textmap --model` |
| metrics.jsonl / metrics.csv | pretrain, train | one row per epoch |
| curves.png | pretrain, train | the training curves |
| run.json / config.yaml / versions.json / split.json | both | the run record, resolved config, versions, split |
| DONE | both | training seconds; present once the run finished |
| .dusss.lock | both | held while a process writes the folder |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODEL = "model.safetensors"
LAST = "last.safetensors"
STATE = "state.safetensors"
VLM = "vlm.safetensors"
TEXT_MASK = "text_mask.safetensors"
METRICS = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CURVES = "curves.png"
RUN = "run.json"
CONFIG = "config.yaml"
VERSIONS = "versions.json"
SPLIT = "split.json"
DONE = "DONE"
LOCK = ".dusss.lock"


@dataclass(frozen=True)
class RunFiles:
    """The files of the run folder `root`, by role (see the module table)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def last(self) -> Path:
        return self.root / LAST

    @property
    def state(self) -> Path:
        return self.root / STATE

    @property
    def vlm(self) -> Path:
        return self.root / VLM

    @property
    def text_mask(self) -> Path:
        return self.root / TEXT_MASK

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def curves(self) -> Path:
        return self.root / CURVES

    @property
    def done(self) -> Path:
        return self.root / DONE


def run_file(path: str | Path, name: str = MODEL) -> Path:
    """`path/name` when `path` is a run folder, else `path` itself (a file given directly): how every command
    that takes "a run folder or its checkpoint" reads its argument."""
    p = Path(path)
    return p / name if p.is_dir() else p


__all__ = ["CONFIG", "CURVES", "DONE", "LAST", "LOCK", "METRICS", "METRICS_CSV", "MODEL", "RUN", "SPLIT", "STATE",
           "TEXT_MASK", "VERSIONS", "VLM", "RunFiles", "run_file"]
