"""Step 1 learns the image-text link: a short CPU pre-training on phantoms retrieves above chance.

The phantoms carry laterality-only reports (`caption_style="laterality"`: no / left / right / bilateral
infection), a vocabulary a run of 114 steps can learn; the full QaTa-style reports are too many distinct
sentences for that (see docs/benchmarks.md). The image encoder is the ImageNet EfficientNet-Lite0 with its
stride-16 map as the global feature (the pooled stride-32 head learns laterality far slower), the text
encoder the packaged MiniLM, frozen (its projection head trains). The momentum encoders follow at 0.9: at
the paper's 0.995 they would still be 56 % their random initial heads after 114 steps, and DuSSS's
cross-modal targets come from them. Measured (i2t R@1 at the last epoch, majority 32.2, chance 25):
clip 62.0, dusss 49.3, dusss without SSS 38.5, amvlm 65.9; about 60 s per run on 2 threads.

Image->text R@1 is the measure: each val image picks one of the 4 reports, so it is a 4-way decision over
~200 images. Text->image R@1 is logged too but is 4 all-or-nothing decisions (every copy of a report
retrieves the same top image), too coarse to assert on.

The DuSSS cases are in test_pretrain_learning_dusss.py and the run and its checks in conftest.py, so that the
two pytest workers share the four runs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytestmark = pytest.mark.slow(seconds=200)  # about this long at one thread (tests/conftest.py runs it early)


@pytest.mark.parametrize("method", ["clip", "amvlm"])
def test_short_pretraining_retrieves_far_above_chance(check_short_pretraining: Callable[[str, bool], None],
                                                      method: str) -> None:
    check_short_pretraining(method, True)
