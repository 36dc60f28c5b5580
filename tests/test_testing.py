from __future__ import annotations

import torch

from dusss.testing import BagOfWordsVLM


def test_bag_of_words_vlm_has_the_vlm_encode_interface() -> None:
    torch.manual_seed(0)
    vlm = BagOfWordsVLM(dim=16, patch=8, batchnorm=True).eval()
    img = vlm.encode_image(torch.rand(2, 3, 32, 48))
    assert img["global"].shape == (2, 16) and img["local"].shape == (2, 24, 16) and img["grid"] == (4, 6)
    torch.testing.assert_close(img["global"].norm(dim=-1), torch.ones(2))
    txt = vlm.encode_text(["left lung", "Left  LUNG", "no finding", ""])
    assert txt["global"].shape == (4, 16) and txt["local"].shape == (4, 1, 16) and txt["mask"].all()
    torch.testing.assert_close(txt["global"][0], txt["global"][1])  # case and spacing do not matter
    assert not torch.allclose(txt["global"][0], txt["global"][2]) and vlm.cfg.embed_dim == 16
