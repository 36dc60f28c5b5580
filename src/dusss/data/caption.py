"""Mask -> report text, from the mask's connected regions (laterality, count, location).

Geometry: zones are the thirds of the image height (upper/middle/lower). A region occupies a zone when at
least `ZONE_SHARE` of its pixels lie in that third, so a tall region spans "upper middle". Left/right
follows the region's centroid column.

Styles:
- ``"qata"``: QaTa-COV19 reports as written for LViT, in the **radiological convention**: the patient's
  left lung is on the image's right (a region whose centroid is right of the vertical midline is in the
  "left lung"). "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
  The count is the number of regions; locations are listed per lung, left lung first; all three zones of
  one lung read "all left lung"; non-adjacent zones read "upper and lower left lung".
- ``"laterality"``: the first clause of ``"qata"`` only, four reports in all: "No pulmonary infection.",
  "Unilateral pulmonary infection, left lung." (or right), "Bilateral pulmonary infection." A coarse
  vocabulary for checking that a VLM learns the image-text link at all on a small, short run.
- ``"generic"``: image coordinates as a viewer sees them (left = image left), one position per region in
  reading order: "Two regions: upper left and lower right." Horizontal thirds give left/center/right.

Texts derived from ground-truth masks describe the answer: never feed them to a model at test time.
Connected components use 8-connectivity and are found from row runs with a union-find (numpy only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dusss.errors import ConfigError

CAPTION_STYLES = ("qata", "laterality", "generic")
ZONE_SHARE = 0.2
ZONES = ("upper", "middle", "lower")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class Region:
    """One connected region: pixel count, centroid (row, col) and the share of its pixels per zone."""

    area: int
    centroid: tuple[float, float]
    zone_share: tuple[float, float, float]


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = np.asarray(mask) != 0
    h, w = m.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = m
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)
    return rows, starts, ends  # row-major order; ends are exclusive


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _run_labels(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Component id (0..n-1, in order of first appearance) of every run, 8-connected."""
    n = len(rows)
    parent = list(range(n))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bounds = np.searchsorted(rows, np.arange(rows[-1] + 2))
    s_list, e_list = starts.tolist(), ends.tolist()
    for r in range(int(rows[0]) + 1, int(rows[-1]) + 1):
        a, a_end = int(bounds[r - 1]), int(bounds[r])
        b, b_end = int(bounds[r]), int(bounds[r + 1])
        while a < a_end and b < b_end:
            # 8-connected overlap of [s, e) runs on adjacent rows: s_a <= e_b and s_b <= e_a
            if s_list[a] <= e_list[b] and s_list[b] <= e_list[a]:
                ra, rb = _find(parent, a), _find(parent, b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if e_list[a] < e_list[b]:
                a += 1
            else:
                b += 1
    roots = np.array([_find(parent, i) for i in range(n)])
    _, labels = np.unique(roots, return_inverse=True)
    return labels


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D mask: (int32 label image with 0 = background, count)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    rows, starts, ends = _runs(m)
    labels = _run_labels(rows, starts, ends)
    out = np.zeros(m.shape, dtype=np.int32)
    for r, s, e, k in zip(rows.tolist(), starts.tolist(), ends.tolist(), labels.tolist()):
        out[r, s:e] = k + 1
    return out, int(labels.max() + 1) if len(labels) else 0


def zone_of_rows(rows: np.ndarray, height: int) -> np.ndarray:
    """Zone index (0 upper, 1 middle, 2 lower: thirds of the image height) of each row index."""
    return np.minimum((np.asarray(rows) * 3) // height, 2)


def find_regions(mask: np.ndarray, min_area: int = 1) -> list[Region]:
    """Connected regions of a 2-D mask (8-connected) with at least `min_area` pixels, in reading order."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    h = m.shape[0]
    rows, starts, ends = _runs(m)
    if len(rows) == 0:
        return []
    labels = _run_labels(rows, starts, ends)
    k = int(labels.max()) + 1
    length = (ends - starts).astype(np.float64)
    col_sum = (starts + ends - 1) * length / 2.0
    area = np.bincount(labels, weights=length, minlength=k)
    row_sum = np.bincount(labels, weights=rows * length, minlength=k)
    cols = np.bincount(labels, weights=col_sum, minlength=k)
    zone_of_row = zone_of_rows(rows, h)
    shares = np.stack(
        [np.bincount(labels, weights=length * (zone_of_row == z), minlength=k) for z in range(3)], axis=1
    )
    regions = []
    for i in range(k):
        if area[i] < min_area:
            continue
        regions.append(
            Region(
                area=int(area[i]),
                centroid=(float(row_sum[i] / area[i]), float(cols[i] / area[i])),
                zone_share=tuple(float(s) for s in shares[i] / area[i]),  # type: ignore[arg-type]
            )
        )
    regions.sort(key=lambda r: (r.centroid[0], r.centroid[1]))
    return regions


def _count_word(n: int) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) else str(n)


def _zones(region: Region) -> set[int]:
    zones = {z for z, s in enumerate(region.zone_share) if s >= ZONE_SHARE}
    return zones or {int(np.argmax(region.zone_share))}


def _zone_phrase(zones: set[int]) -> str:
    z = sorted(zones)
    if z == [0, 1, 2]:
        return "all"
    if z == [0, 2]:
        return "upper and lower"
    return " ".join(ZONES[i] for i in z)


def _side(region: Region, width: int) -> str:
    """The region's lung, radiological convention (image right = patient's left)."""
    return "left" if region.centroid[1] >= (width - 1) / 2.0 else "right"


def _lung_zones(regions: list[Region], width: int) -> dict[str, set[int]]:
    """Zones occupied per lung, radiological convention (image right = patient's left)."""
    sides: dict[str, set[int]] = {}
    for r in regions:
        sides.setdefault(_side(r, width), set()).update(_zones(r))
    return sides


def _laterality(regions: list[Region], width: int) -> str:
    if not regions:
        return "No pulmonary infection."
    sides = _lung_zones(regions, width)
    if len(sides) == 2:
        return "Bilateral pulmonary infection."
    return f"Unilateral pulmonary infection, {next(iter(sides))} lung."


def _qata(regions: list[Region], width: int) -> str:
    if not regions:
        return "No pulmonary infection."
    sides = _lung_zones(regions, width)
    n = len(regions)
    extent = "Bilateral" if len(sides) == 2 else "Unilateral"
    areas = f"{_count_word(n)} infected area{'s' if n > 1 else ''}"
    places = [f"{_zone_phrase(sides[s])} {s} lung" for s in ("left", "right") if s in sides]
    return f"{extent} pulmonary infection, {areas}, {' and '.join(places)}."


def _generic_position(r: Region, height: int, width: int) -> str:
    v = ZONES[min(int(r.centroid[0] * 3 // height), 2)]
    hz = ("left", "center", "right")[min(int(r.centroid[1] * 3 // width), 2)]
    if v == "middle" and hz == "center":
        return "center"
    return f"{v} {hz}"


def _generic(regions: list[Region], height: int, width: int) -> str:
    if not regions:
        return "No regions."
    n = len(regions)
    places = [_generic_position(r, height, width) for r in regions]
    joined = places[0] if n == 1 else ", ".join(places[:-1]) + " and " + places[-1]
    word = _count_word(n)
    return f"{word[0].upper() + word[1:]} region{'s' if n > 1 else ''}: {joined}."


def described_cells(mask: np.ndarray) -> np.ndarray:
    """Bool [H,W]: the (lung, zone) cells that the ``"qata"`` report of `mask` names, each a third of the image
    height by a half of its width ("lower left lung" = the bottom third of the image's right half); all False
    for a lesion-free mask ("No pulmonary infection."). Everything that report says about *where*, as pixels."""
    m = np.asarray(mask) >= 0.5
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    h, w = m.shape
    zone = zone_of_rows(np.arange(h), h)[:, None]
    left = (np.arange(w) >= (w - 1) / 2.0)[None, :]  # the patient's left lung, as `_side` reads a centroid
    cells = np.zeros((h, w), dtype=bool)
    for side, zones in _lung_zones(find_regions(m.astype(np.uint8)), w).items():
        on_side = left if side == "left" else ~left
        for z in zones:
            cells |= (zone == z) & on_side
    return cells


def check_caption_style(style: str, option: str = "style") -> None:
    """ConfigError naming `option` unless `style` is one of CAPTION_STYLES."""
    if style not in CAPTION_STYLES:
        raise ConfigError(f"{option} must be one of {', '.join(CAPTION_STYLES)}, got {style!r}")


def caption_mask(mask: np.ndarray, style: str = "qata", min_area: int = 1) -> str:
    """A report sentence for a 2-D binary mask (see the module docstring for the styles)."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    regions = find_regions(m, min_area=min_area)
    if style == "qata":
        return _qata(regions, m.shape[1])
    if style == "laterality":
        return _laterality(regions, m.shape[1])
    if style == "generic":
        return _generic(regions, m.shape[0], m.shape[1])
    raise ValueError(f"unknown caption style {style!r} (use one of {', '.join(CAPTION_STYLES)})")


def sub_report(mask: np.ndarray, keep: np.ndarray, style: str = "qata") -> tuple[str, np.ndarray]:
    """The report of a subset of the mask's lesions and the mask of that subset.

    `keep[i]` says whether connected region i (in `label_components` order) stays; regions beyond `len(keep)`
    are dropped. Keeping none gives the lesion-free report ("No pulmonary infection." for qata) and an empty
    mask. Used to teach a text-mask generator that the report chooses which lesions light up.
    """
    m = np.asarray(mask) >= 0.5
    labels, n = label_components(m)
    kept = np.flatnonzero(np.asarray(keep, dtype=bool)[:n]) + 1
    sub = np.isin(labels, kept)
    return caption_mask(sub.astype(np.uint8), style), sub


def described_lesions(mask: np.ndarray, report_mask: np.ndarray, style: str = "qata") -> tuple[str, np.ndarray]:
    """The report of `report_mask` and the lesions of `mask` that this report describes.

    A lesion (connected region of `mask`) is described when its lung and every zone it occupies are named by
    the report (the lungs and zones of `report_mask`'s regions, as `caption_mask` words them). With the mask of
    another image as `report_mask` this is a counterfactual report: "lower left lung" for an image whose lesion
    is in the right lung describes none of it. Used to teach a text-mask generator that the report chooses
    where the mask lights up, also on images with a single lesion.
    """
    m = np.asarray(mask) >= 0.5
    r = np.asarray(report_mask) >= 0.5
    if m.shape != r.shape:
        raise ValueError(f"mask {m.shape} and report mask {r.shape} differ in shape")
    named = _lung_zones(find_regions(r), r.shape[1])
    labels, n = label_components(m)
    out = np.zeros_like(m)
    for k in range(1, n + 1):
        region = labels == k
        (reg,) = find_regions(region)
        if _zones(reg) <= named.get(_side(reg, m.shape[1]), set()):
            out |= region
    return caption_mask(r.astype(np.uint8), style), out
