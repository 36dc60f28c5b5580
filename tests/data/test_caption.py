from __future__ import annotations

import numpy as np
import pytest

from dusss.data.caption import caption_mask, described_cells, find_regions, label_components

from .builders import box_mask

# 90x90 image: thirds are rows 0-29 / 30-59 / 60-89 and columns 0-29 / 30-59 / 60-89.
UPPER_IMAGE_RIGHT = (5, 15, 65, 80)  # patient's left lung, upper zone
LOWER_IMAGE_LEFT = (70, 85, 10, 25)  # patient's right lung, lower zone
MIDDLE_IMAGE_LEFT = (40, 50, 10, 25)


@pytest.mark.parametrize(
    ("boxes", "qata", "generic", "laterality"),
    [
        ((), "No pulmonary infection.", "No regions.", "No pulmonary infection."),
        (
            (UPPER_IMAGE_RIGHT, LOWER_IMAGE_LEFT),
            "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
            "Two regions: upper right and lower left.",
            "Bilateral pulmonary infection.",
        ),
        (
            (MIDDLE_IMAGE_LEFT,),
            "Unilateral pulmonary infection, one infected area, middle right lung.",
            "One region: middle left.",
            "Unilateral pulmonary infection, right lung.",
        ),
        (
            ((5, 85, 65, 80),),  # one tall region over all three zones of the patient's left lung
            "Unilateral pulmonary infection, one infected area, all left lung.",
            "One region: middle right.",
            "Unilateral pulmonary infection, left lung.",
        ),
        (
            ((20, 50, 65, 80),),  # rows 20-49: 10 px upper (33 %), 20 px middle
            "Unilateral pulmonary infection, one infected area, upper middle left lung.",
            "One region: middle right.",
            "Unilateral pulmonary infection, left lung.",
        ),
        (
            ((5, 15, 65, 80), (70, 85, 65, 80)),
            "Unilateral pulmonary infection, two infected areas, upper and lower left lung.",
            "Two regions: upper right and lower right.",
            "Unilateral pulmonary infection, left lung.",
        ),
        (
            ((5, 15, 65, 80), (70, 85, 65, 80), MIDDLE_IMAGE_LEFT),
            (
                "Bilateral pulmonary infection, three infected areas, "
                "upper and lower left lung and middle right lung."
            ),
            "Three regions: upper right, middle left and lower right.",
            "Bilateral pulmonary infection.",
        ),
        (
            ((40, 50, 40, 50),),
            "Unilateral pulmonary infection, one infected area, middle left lung.",
            "One region: center.",
            "Unilateral pulmonary infection, left lung.",
        ),
    ],
)
def test_captions_of_known_layouts(boxes, qata: str, generic: str, laterality: str) -> None:
    mask = box_mask(90, 90, *boxes)
    assert caption_mask(mask, style="qata") == qata
    assert caption_mask(mask, style="generic") == generic
    assert caption_mask(mask, style="laterality") == laterality
    assert qata.startswith(laterality.rstrip(".").split(",")[0])


def test_small_zone_share_is_ignored() -> None:
    # rows 25-59: 5 px (14 %) in the upper third are below the 20 % share, so only "middle"
    mask = box_mask(90, 90, (25, 60, 10, 25))
    assert caption_mask(mask) == "Unilateral pulmonary infection, one infected area, middle right lung."


def test_diagonal_pixels_are_one_region_and_min_area_filters() -> None:
    mask = np.eye(6, dtype=np.uint8)
    assert label_components(mask)[1] == 1
    mask2 = box_mask(30, 30, (0, 5, 0, 5), (20, 21, 20, 21))
    assert len(find_regions(mask2)) == 2 and len(find_regions(mask2, min_area=2)) == 1
    assert caption_mask(mask2, style="generic", min_area=2) == "One region: upper left."


def test_label_components_against_a_hand_labelled_pattern() -> None:
    mask = np.array(
        [
            [1, 1, 0, 0, 1],
            [0, 1, 0, 0, 1],
            [0, 0, 0, 1, 0],
            [1, 0, 0, 0, 0],
            [1, 0, 1, 1, 1],
        ],
        dtype=np.uint8,
    )
    labels, n = label_components(mask)
    assert n == 4  # {top-left}, {right column + diagonal (2,3)}, {bottom-left}, {bottom row right}
    assert labels[0, 4] == labels[2, 3] != labels[0, 0]
    assert labels[3, 0] == labels[4, 0] and labels[4, 2] == labels[4, 4]
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}


def test_region_statistics() -> None:
    (r,) = find_regions(box_mask(9, 9, (0, 3, 0, 2)))
    assert r.area == 6 and r.centroid == (1.0, 0.5) and r.zone_share == (1.0, 0.0, 0.0)


def test_many_regions_and_bad_arguments() -> None:
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[::4, ::4] = 1  # 100 isolated pixels
    assert caption_mask(mask).startswith("Bilateral pulmonary infection, 100 infected areas, all left lung")
    with pytest.raises(ValueError, match="unknown caption style"):
        caption_mask(mask, style="poetic")
    with pytest.raises(ValueError, match="2-D"):
        caption_mask(np.zeros((2, 2, 2)))


def test_sub_report_describes_only_the_kept_lesions() -> None:
    import numpy as np

    from dusss.data.caption import caption_mask, label_components, sub_report

    mask = np.zeros((30, 30), dtype=np.uint8)
    mask[2:6, 2:6] = 1  # upper, image left = patient's right lung
    mask[24:28, 22:27] = 1  # lower, image right = patient's left lung
    labels, n = label_components(mask)
    assert n == 2
    first = labels[3, 3]
    keep = np.zeros(2, dtype=bool)
    keep[first - 1] = True
    text, sub = sub_report(mask, keep)
    assert text == "Unilateral pulmonary infection, one infected area, upper right lung."
    assert sub.sum() == 16 and sub[3, 3] and not sub[25, 24]
    assert sub_report(mask, np.ones(2, dtype=bool))[0] == caption_mask(mask)
    text, sub = sub_report(mask, np.zeros(5, dtype=bool))
    assert text == "No pulmonary infection." and not sub.any()


def test_described_lesions_are_those_whose_lung_and_zones_the_report_names() -> None:
    from dusss.data.caption import described_lesions

    m = np.zeros((30, 30), np.uint8)
    m[2:5, 2:5] = 1  # upper zone, image left = patient's right lung
    m[22:26, 22:26] = 1  # lower zone, image right = patient's left lung
    upper_left = np.zeros_like(m)
    upper_left[1:4, 20:24] = 1
    text, target = described_lesions(m, upper_left)  # names a zone where m has no lesion
    assert text == "Unilateral pulmonary infection, one infected area, upper left lung." and not target.any()
    lower_left = np.zeros_like(m)
    lower_left[20:24, 24:27] = 1
    text, target = described_lesions(m, lower_left)
    assert text.endswith("lower left lung.") and np.array_equal(target, m.astype(bool) & (np.arange(30) >= 15))
    text, target = described_lesions(m, m)  # its own report describes every lesion
    assert text == caption_mask(m) and np.array_equal(target, m.astype(bool))
    text, target = described_lesions(m, np.zeros_like(m))
    assert text == "No pulmonary infection." and not target.any()


def test_described_cells_are_the_named_lung_zones_as_pixels() -> None:
    """6 x 4 image: zones are rows 0-1 / 2-3 / 4-5, the patient's left lung is columns 2-3 (radiological)."""
    m = np.zeros((6, 4), dtype=np.uint8)
    m[5, 0] = 1  # bottom row, image left: "lower right lung"
    m[1:4, 3] = 1  # rows 1-3 of the image's right column: a third in the upper zone, two in the middle
    assert caption_mask(m) == "Bilateral pulmonary infection, two infected areas, upper middle left lung and lower right lung."
    want = np.zeros((6, 4), dtype=bool)
    want[4:6, 0:2] = True  # lower right lung
    want[0:4, 2:4] = True  # upper and middle left lung
    np.testing.assert_array_equal(described_cells(m), want)
    assert not described_cells(np.zeros((6, 4))).any()  # "No pulmonary infection." names no cell
    with pytest.raises(ValueError, match="2-D"):
        described_cells(np.zeros((1, 6, 4)))
