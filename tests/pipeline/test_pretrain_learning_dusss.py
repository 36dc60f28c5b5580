"""Step 1 learns the image-text link under DuSSS's objective, with and without the SSS term: the DuSSS half of
the short pre-training cases (the CLIP and AMVLM half, and what the runs measure, are in test_pretrain_learning.py;
the run and its checks in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytestmark = pytest.mark.slow(seconds=210)  # about this long at one thread (tests/conftest.py runs it early)


@pytest.mark.parametrize("sss", [True, False])
def test_short_dusss_pretraining_retrieves_far_above_chance(check_short_pretraining: Callable[[str, bool], None],
                                                            sss: bool) -> None:
    check_short_pretraining("dusss", sss)
