from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dusss.data.caption import caption_mask, label_components
from dusss.data.manifest import read_manifest
from dusss.data.readers import read_image, read_mask
from dusss.data.synth import generate_phantoms
from dusss.data.verify import verify_manifest
from dusss.errors import ConfigError, DataError


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("phantoms")
    t0 = time.perf_counter()
    manifest = generate_phantoms(out, n=64, size=128, seed=0)
    return manifest, time.perf_counter() - t0


def test_layout_splits_and_speed(phantoms: tuple[Path, float]) -> None:
    manifest, seconds = phantoms
    recs = read_manifest(manifest)
    assert len(recs) == 64 and manifest.name == "manifest.csv"
    assert Counter(r.split for r in recs) == {"train": 38, "val": 13, "test": 13}
    assert len({r.case_id for r in recs}) == 64 and all(r.labeled for r in recs)
    assert all(
        r.key.startswith("images/") and r.mask is not None and r.mask.parent.name == "masks" for r in recs
    )
    img = read_image(recs[0].image)
    assert img.shape == (128, 128, 3)
    assert seconds < 3.0, f"n=64 at 128 px took {seconds:.2f} s"


def test_manifest_passes_verify(phantoms: tuple[Path, float]) -> None:
    report = verify_manifest(phantoms[0])
    assert report.problems == []
    assert report.summary["image_sizes"] == {"128x128": 64}


def test_texts_are_the_captions_of_the_masks(phantoms: tuple[Path, float]) -> None:
    recs = read_manifest(phantoms[0])
    kinds = Counter(r.text.split(" ")[0] for r in recs)
    assert set(kinds) == {"No", "Unilateral", "Bilateral"}
    assert 3 <= kinds["No"] <= 16  # about 10-20 % empty masks
    counts = Counter()
    for r in recs:
        mask = read_mask(r.mask)
        assert r.text == caption_mask(mask, style="qata")
        counts[label_components(mask)[1]] += 1
    assert set(counts) <= {0, 1, 2, 3} and counts[1] > 0 and counts[2] > 0


def test_laterality_follows_the_radiological_convention(phantoms: tuple[Path, float]) -> None:
    for r in read_manifest(phantoms[0]):
        if r.text.startswith("Unilateral"):
            cols = np.nonzero(read_mask(r.mask))[1]
            on_image_right = cols.mean() > 63.5
            assert ("left lung" in r.text) == on_image_right, r.text


def test_some_lesions_are_faint(phantoms: tuple[Path, float]) -> None:
    contrasts = []
    for r in read_manifest(phantoms[0]):
        mask = read_mask(r.mask).astype(bool)
        if not mask.any():
            continue
        img = read_image(r.image)[:, :, 0]
        ring = mask.copy()
        for _ in range(4):
            ring = (
                ring | np.roll(ring, 1, 0) | np.roll(ring, -1, 0) | np.roll(ring, 1, 1) | np.roll(ring, -1, 1)
            )
        ring &= ~mask
        contrasts.append(float(img[mask].mean() - img[ring].mean()))
    contrasts = np.array(contrasts)
    assert (contrasts < 0.06).sum() >= 3 and (contrasts > 0.12).sum() >= 10


def test_same_seed_same_bytes_and_prefix_stability(tmp_path: Path) -> None:
    a = generate_phantoms(tmp_path / "a", n=6, size=64, seed=3).parent
    b = generate_phantoms(tmp_path / "b", n=6, size=64, seed=3).parent
    c = generate_phantoms(tmp_path / "c", n=6, size=64, seed=4).parent
    d = generate_phantoms(tmp_path / "d", n=9, size=64, seed=3).parent
    assert _digest(a) == _digest(b) != _digest(c)
    for name in ("images/phantom_0002.png", "masks/phantom_0005.png"):
        assert (a / name).read_bytes() == (d / name).read_bytes()


def test_caption_style_changes_only_the_texts(tmp_path: Path) -> None:
    qata = read_manifest(generate_phantoms(tmp_path / "q", n=12, size=64, seed=1))
    lat = read_manifest(generate_phantoms(tmp_path / "l", n=12, size=64, seed=1, caption_style="laterality"))
    assert [r.image.name for r in qata] == [r.image.name for r in lat]
    assert (tmp_path / "q/images/phantom_0003.png").read_bytes() == (tmp_path / "l/images/phantom_0003.png").read_bytes()
    assert {r.text for r in lat} <= {
        "No pulmonary infection.", "Bilateral pulmonary infection.",
        "Unilateral pulmonary infection, left lung.", "Unilateral pulmonary infection, right lung.",
    }
    for q, la in zip(qata, lat):
        assert q.text.split(",")[0].rstrip(".") == la.text.split(",")[0].rstrip(".")
    with pytest.raises(ConfigError, match="caption-style"):
        generate_phantoms(tmp_path / "x", n=3, size=32, caption_style="verbose")


@pytest.mark.parametrize(("n", "size", "seed"), [(2, 64, 0), (1_000_001, 64, 0), (10, 16, 0), (10, 64, -1)])
def test_bad_arguments_write_nothing(tmp_path: Path, n: int, size: int, seed: int) -> None:
    with pytest.raises(ConfigError):
        generate_phantoms(tmp_path / "out", n=n, size=size, seed=seed)
    assert not (tmp_path / "out").exists()


def test_output_path_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        generate_phantoms(f, n=3, size=32)


def test_lung_zone_masks_are_the_report_zones_of_the_lungs(phantoms: tuple[Path, float]) -> None:
    from dusss.data.synth import lung_zone_masks

    zones = lung_zone_masks(128)
    assert set(zones) == {(z, s) for z in ("upper", "middle", "lower") for s in ("left", "right")}
    stacked = np.stack(list(zones.values())).astype(int)
    assert stacked.sum(0).max() == 1  # disjoint
    for (zone, side), m in zones.items():  # the report of a lesion filling a zone names that zone
        assert caption_mask(m.astype(np.uint8)).endswith(f"one infected area, {zone} {side} lung.")
    lungs = stacked.sum(0) > 0
    manifest, _ = phantoms
    inside = total = 0
    for rec in read_manifest(manifest):
        m = read_mask(rec.mask) >= 0.5
        inside, total = inside + int((m & lungs).sum()), total + int(m.sum())
    assert total > 0 and inside / total > 0.9  # the nominal lungs hold the (jittered) phantoms' lesions
