from __future__ import annotations

import numpy as np

from dusss.data.text_aug import augment_text, swap_laterality

QATA = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."


def test_swap_laterality_keeps_case_and_whole_words() -> None:
    assert swap_laterality(QATA) == (
        "Bilateral pulmonary infection, two infected areas, upper right lung and lower left lung."
    )
    assert (
        swap_laterality("Left lower, RIGHT upper; leftover bright")
        == "Right lower, LEFT upper; leftover bright"
    )
    assert swap_laterality(swap_laterality(QATA)) == QATA


def test_nothing_happens_with_zero_probabilities() -> None:
    out = augment_text(QATA, np.random.default_rng(0), p_shuffle=0, p_synonym=0, p_drop=0)
    assert out == QATA


def test_deterministic_given_the_generator() -> None:
    outs = [augment_text(QATA, np.random.default_rng(7)) for _ in range(3)]
    assert outs[0] == outs[1] == outs[2]
    assert len({augment_text(QATA, np.random.default_rng(s)) for s in range(30)}) > 5


def test_shuffle_keeps_the_clauses() -> None:
    for s in range(20):
        out = augment_text(QATA, np.random.default_rng(s), p_shuffle=1, p_synonym=0, p_drop=0)
        assert out.endswith(".") and out[0].isupper()
        clauses = sorted(c.strip().lower() for c in out[:-1].split(","))
        assert clauses == sorted(c.strip().lower() for c in QATA[:-1].split(","))


def test_dropout_never_drops_everything() -> None:
    for s in range(20):
        out = augment_text(QATA, np.random.default_rng(s), p_shuffle=0, p_synonym=0, p_drop=1)
        assert len(out[:-1].split(",")) == 1 and out.endswith(".")
    assert augment_text("No pulmonary infection.", np.random.default_rng(0), p_drop=1, p_synonym=0) == (
        "No pulmonary infection."
    )


def test_synonyms_never_touch_sides() -> None:
    out = augment_text(QATA, np.random.default_rng(0), p_shuffle=0, p_synonym=1, p_drop=0)
    assert "infection" not in out and ("opacity" in out or "opacification" in out)
    assert out.index("left") < out.index("right")
    assert ("upper" not in out) and ("lower" not in out)  # upper -> apical, lower -> basal


def test_blank_text_is_returned_unchanged() -> None:
    assert augment_text("  ", np.random.default_rng(0)) == "  "
