from __future__ import annotations

from pathlib import Path

import pytest

from .builders import make_dataset


@pytest.fixture
def tiny_manifest(tmp_path: Path) -> Path:
    """A valid five-row manifest (3 train incl. one unlabeled, 1 val, 1 test) with 16x16 images."""
    return make_dataset(tmp_path / "ds")
