"""Shared test fixtures: tiny phantom data with a split, a tiny randomly initialised VLM checkpoint, and the
torch thread count restored after every test (several tests pin it to 1 for exact comparisons)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

SLOW_MARK = re.compile(r"pytest\.mark\.slow\(seconds=(\d+(?:\.\d+)?)\)")


def _module_seconds(root: Path) -> dict[str, float]:
    """{test file relative to `root`: the seconds its `pytest.mark.slow(seconds=N)` module mark declares}."""
    out = {}
    for path in sorted((root / "tests").rglob("test_*.py")):
        match = SLOW_MARK.search(path.read_text())
        if match:
            out[path.relative_to(root).as_posix()] = float(match.group(1))
    return out


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Longest modules first under `--dist loadfile` (`make test`): xdist hands out whole files, the ones with
    the most tests first, so a long module with few tests (the Step-1 learning runs) used to start last and run
    alone on one worker while the other idled. This scheduler hands out the files marked
    `pytest.mark.slow(seconds=N)` first, longest first, then the rest in xdist's order."""
    if config.getoption("dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    seconds = _module_seconds(Path(str(config.rootpath)))

    class LongestFirst(LoadFileScheduling):  # type: ignore[misc]
        _ordered = False

        def _assign_work_unit(self, node: Any) -> None:
            if not self._ordered:
                self._ordered = True
                ordered = sorted(self.workqueue.items(), key=lambda item: -seconds.get(item[0].split("::")[0], 0.0))
                self.workqueue.clear()
                self.workqueue.update(ordered)
            super()._assign_work_unit(node)

    return LongestFirst(config, log)


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
    """`write(path, image_size=32)` saves a seeded, randomly initialised VLM checkpoint (no pretrained files) at
    `path`, for images of `image_size` px."""
    import torch

    from dusss.checkpoint import save_checkpoint
    from dusss.models.image_encoders import ImageEncoderConfig
    from dusss.models.text_encoders import TextEncoderConfig
    from dusss.models.vlm import VisionLanguageModel, VLMConfig

    def write(path: Path, image_size: int = 32) -> Path:
        cfg = VLMConfig(image=ImageEncoderConfig(image_size=image_size, hidden_size=16, num_layers=1, num_heads=2),
                        text=TextEncoderConfig(random_init=True, num_layers=1, hidden_size=16, num_heads=2,
                                               intermediate_size=32),
                        embed_dim=8, head_hidden=16, pdt_heads=2)
        torch.manual_seed(0)
        tensors, meta = VisionLanguageModel(cfg).to_checkpoint()
        save_checkpoint(path, tensors, "vlm", {**meta, "image_size": image_size})
        return path

    return write
