"""Zone steering metric of the text-mask generator (`dusss.engine.text_eval`), on hand-built maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dusss.data.manifest import read_manifest
from dusss.data.synth import generate_phantoms
from dusss.engine.text_eval import NONE_PROMPT, report_ceiling, zone_margin, zone_prompts, zone_scores

SIZE = 64


def test_zone_margin_on_a_hand_built_map() -> None:
    lungs = np.zeros((4, 4), dtype=bool)
    lungs[:, :2] = True  # 8 lung pixels
    zone = np.zeros((4, 4), dtype=bool)
    zone[:2, :2] = True  # 4 of them
    prob = np.zeros((4, 4))
    prob[:2, :2] = [[1.0, 0.5], [0.5, 0.0]]  # zone mean 0.5
    prob[2:, :2] = [[0.25, 0.25], [0.0, 0.0]]  # rest of the lungs: mean 0.125
    prob[:, 2:] = 9.0  # outside the lungs: ignored
    assert zone_margin(prob, zone, lungs) == pytest.approx(0.375)
    with pytest.raises(ValueError):
        zone_margin(prob, lungs, lungs)  # nothing in the lungs outside the zone


def test_zone_prompts_are_the_phantom_reports_of_six_disjoint_zones() -> None:
    zones = zone_prompts(64)
    assert set(zones) == {(z, s) for z in ("upper", "middle", "lower") for s in ("left", "right")}
    assert set(zone_prompts(32)) == set(zones) - {("lower", "left")}  # empty at 32 px: left out
    for (z, s), (text, mask) in zones.items():
        assert text == f"Unilateral pulmonary infection, one infected area, {z} {s} lung."
        assert mask.sum() > 0
    stacked = np.stack([m for _, m in zones.values()]).astype(int)
    assert stacked.sum(0).max() == 1


class _ZoneOracle(nn.Module):
    """Stand-in generator: a zone prompt lights exactly its zone (logit ±20); `blind` ignores the prompt."""

    def __init__(self, blind: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.blind = blind
        self.masks = {text: torch.from_numpy(m) for text, m in zone_prompts(SIZE).values()}

    def text_logits(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        first = next(iter(self.masks.values()))
        maps = [(self.masks.get(t, torch.zeros_like(first)) if not self.blind else first).float() * 40 - 20
                for t in texts]
        return torch.stack(maps)[:, None] + self.w


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list:
    return read_manifest(generate_phantoms(tmp_path_factory.mktemp("zones") / "d", n=3, size=SIZE, seed=0))


def test_zone_scores_of_a_generator_that_follows_the_zone_words(records: list) -> None:
    gen = _ZoneOracle()
    out = zone_scores(gen, records, SIZE)
    assert out["n"] == 3
    assert out["zone_margin"] == pytest.approx(1.0, abs=1e-6)
    assert out["zone_margin_min"] == pytest.approx(1.0, abs=1e-6)
    assert out["zone_hit"] == 1.0 and out["none_below"] == 1.0
    assert out["zone_gain"] > 1.0  # naming another zone also darkens this one against the lit zone
    # "No pulmonary infection." is dark everywhere; the smallest zone covers its share of the lungs
    lungs = np.logical_or.reduce([m for _, m in zone_prompts(SIZE).values()])
    smallest = min(m.sum() for _, m in zone_prompts(SIZE).values()) / lungs.sum()
    assert out["none_mean"] == pytest.approx(0.0, abs=1e-6)
    assert out["none_gap"] == pytest.approx(smallest, abs=1e-6)
    assert gen.training  # the mode is restored


def test_zone_scores_of_a_text_blind_generator(records: list) -> None:
    out = zone_scores(_ZoneOracle(blind=True), records, SIZE)
    # the same map under every prompt: its own zone wins and the five others lose, but the prompt changes
    # nothing (zone gain 0) and "none" is no lower
    assert out["margin_upper_right"] == pytest.approx(1.0, abs=1e-6)
    assert out["zone_margin_min"] < -0.1
    assert out["zone_gain"] == pytest.approx(0.0, abs=1e-6)
    assert out["none_gap"] == pytest.approx(0.0, abs=1e-6) and out["none_below"] == 0.0
    assert NONE_PROMPT not in {t for t, _ in zone_prompts(SIZE).values()}


def test_report_ceiling_cuts_the_pseudo_label_to_the_cells_and_components_the_report_names() -> None:
    """6 x 4 image, one lesion in the "lower right lung" (rows 4-5, columns 0-1 are its cell)."""
    mask = np.zeros((6, 4))
    mask[5, 0:2] = 1  # 2 px
    prob = np.full((6, 4), 0.4)
    prob[3:6, 0] = 0.6  # a blob from the middle zone down into the lesion's cell ...
    prob[5, 1] = 0.5  # ... (threshold 0.5 counts as foreground) ...
    prob[0, 3] = 0.9  # ... and a false positive in the upper left lung, which the report does not name
    got = report_ceiling(prob, mask)
    assert got["pseudo"] == pytest.approx(2 * 2 / (5 + 2))  # 5 predicted px, 2 of them on the lesion
    assert got["cells"] == pytest.approx(2 * 2 / (3 + 2))  # (3,0) and (0,3) fall outside the named cell
    assert got["components"] == pytest.approx(2 * 2 / (4 + 2))  # the blob touching the cell stays whole
    assert np.isnan(got["false_positive"])
    assert report_ceiling(prob, mask, threshold=0.55)["pseudo"] == pytest.approx(2 * 1 / (4 + 2))


def test_report_ceiling_on_a_lesion_free_image_counts_the_false_positive() -> None:
    empty = np.zeros((6, 4))
    got = report_ceiling(np.full((6, 4), 0.7), empty)
    assert np.isnan(got["pseudo"]) and np.isnan(got["cells"]) and np.isnan(got["components"])
    assert got["false_positive"] == 1.0
    assert report_ceiling(np.full((6, 4), 0.2), empty)["false_positive"] == 0.0
