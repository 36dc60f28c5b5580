"""Shared test fixtures: tiny phantom data with a split, a tiny randomly initialised VLM checkpoint, and the
torch thread count restored after every test (several tests pin it to 1 for exact comparisons)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest modules first: a module marked `pytest.mark.slow(seconds=N)` (its time at one thread) runs before
    the unmarked ones, longest first, so that the two `make test` workers (`--dist loadfile`, one module per
    worker at a time) do not end with one long module on one worker while the other idles. The order of the
    tests inside a module is kept (the sort is stable)."""

    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("slow")
        return float(mark.kwargs.get("seconds", 0)) if mark is not None else 0.0

    items.sort(key=lambda item: -seconds(item))


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    """A test that calls torch.set_num_threads(1) must not slow every test after it."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a running process (for run-folder lock tests: a lock it holds is live), killed afterwards."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def phantom_split() -> Callable[[Path], tuple[Path, Path]]:
    """`make(root)` writes 24 phantoms at 32 px under root/ph and a 50 %-labeled split root/split.json;
    returns (manifest, split)."""
    from dusss.data.manifest import read_manifest
    from dusss.data.splits import make_split, save_split
    from dusss.data.synth import generate_phantoms

    def make(root: Path) -> tuple[Path, Path]:
        manifest = generate_phantoms(root / "ph", n=24, size=32, seed=0)
        split = root / "split.json"
        save_split(make_split(read_manifest(manifest), 0.5, seed=0), split)
        return manifest, split

    return make


@pytest.fixture(scope="session")
def tiny_vlm_checkpoint() -> Callable[[Path], Path]:
    """`write(path)` saves a seeded, randomly initialised 32-px VLM checkpoint (no pretrained files) at `path`."""
    import torch

    from dusss.checkpoint import save_checkpoint
    from dusss.models.image_encoders import ImageEncoderConfig
    from dusss.models.text_encoders import TextEncoderConfig
    from dusss.models.vlm import VisionLanguageModel, VLMConfig

    def write(path: Path) -> Path:
        cfg = VLMConfig(image=ImageEncoderConfig(image_size=32, hidden_size=16, num_layers=1, num_heads=2),
                        text=TextEncoderConfig(random_init=True, num_layers=1, hidden_size=16, num_heads=2,
                                               intermediate_size=32),
                        embed_dim=8, head_hidden=16, pdt_heads=2)
        torch.manual_seed(0)
        tensors, meta = VisionLanguageModel(cfg).to_checkpoint()
        save_checkpoint(path, tensors, "vlm", {**meta, "image_size": 32})
        return path

    return write
