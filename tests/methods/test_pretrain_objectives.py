"""Step-1 objectives: gradients reach every trainable parameter, determinism, Table-2 switches, the DuSSS
pairing, retrieval@k, a distributed (2-rank gloo) equivalence check, and a short toy training run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dusss.errors import ConfigError
from dusss.losses.contrastive import clip_loss
from dusss.methods.pretrain import (
    PRETRAIN_METHODS,
    PretrainObjectiveConfig,
    build_pretrain_objective,
    contrastive_pair,
    retrieval_at_k,
)
from dusss.models.image_encoders import ImageEncoderConfig
from dusss.models.text_encoders import TextEncoderConfig
from dusss.models.vlm import VisionLanguageModel, VLMConfig


def tiny_vlm(seed: int = 0, momentum: float = 0.995) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel(VLMConfig(
        image=ImageEncoderConfig(image_size=32, hidden_size=16, num_layers=1, num_heads=2),
        text=TextEncoderConfig(random_init=True, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32,
                               dropout=0.0),
        embed_dim=8, head_hidden=16, pdt_heads=2, momentum=momentum,
    ))


def make_batch(seed: int = 0, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    texts = ["left lung opacity", "right lower lobe", "bilateral infection of both lungs", "no finding", "upper left",
             "small area right", "large lesion", "diffuse pattern"][:n]
    return {"image": torch.rand(n, 3, 32, 32, generator=g), "image_aug": torch.rand(n, 3, 32, 32, generator=g),
            "text": texts, "text_aug": [t + " seen" for t in texts], "key": [str(i) for i in range(n)]}


# Parameters an objective legitimately leaves untouched (CLIP uses neither tokens nor Gaussians).
UNUSED = {"dusss": (), "amvlm": (), "clip": ("image_local.", "text_local.", "pdt_image.", "pdt_text.")}


@pytest.mark.parametrize("name", sorted(PRETRAIN_METHODS))
def test_gradients_reach_every_trainable_parameter(name: str) -> None:
    vlm = tiny_vlm()
    loss, logs = build_pretrain_objective(name)(vlm, make_batch())
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    assert logs and all(isinstance(v, float) for v in logs.values())
    loss.backward()
    missing = [n for n, p in vlm.named_parameters()
               if p.requires_grad and not n.startswith(UNUSED[name])
               and (p.grad is None or float(p.grad.abs().sum()) == 0)]
    assert missing == []
    assert all(p.grad is None for n, p in vlm.named_parameters() if not p.requires_grad)
    if name == "dusss":
        assert 0 < logs["d_sss_mean"] <= 1 and "loss_imc" in logs


@pytest.mark.parametrize("name", sorted(PRETRAIN_METHODS))
def test_same_seed_same_loss(name: str) -> None:
    losses = []
    for _ in range(2):
        vlm = tiny_vlm(seed=3)
        torch.manual_seed(11)
        losses.append(float(build_pretrain_objective(name)(vlm, make_batch())[0].detach()))
    assert losses[0] == losses[1]


def test_table2_switches() -> None:
    def run(cfg: PretrainObjectiveConfig) -> tuple[float, dict]:
        vlm = tiny_vlm(seed=5)
        torch.manual_seed(0)
        loss, logs = build_pretrain_objective("dusss", cfg)(vlm, make_batch())
        return float(loss.detach()), logs

    off, logs_off = run(PretrainObjectiveConfig(sss=False))
    lam0, _ = run(PretrainObjectiveConfig(sss_lambda=0.0))
    assert off == lam0 and logs_off["d_sss_mean"] == 1.0
    on, logs_on = run(PretrainObjectiveConfig())
    assert on != off and logs_on["d_sss_mean"] < 1.0
    no_dcl, logs_nd = run(PretrainObjectiveConfig(dcl=False))
    assert "loss_imc" not in logs_nd and abs(no_dcl - logs_nd["loss_cmc"]) < 1e-6


def test_dusss_pairs_online_with_momentum_views() -> None:
    """With SSS off: L = 1/2[CLIP(I1, T2_m) + CLIP(T1, I2_m)] + 1/2[CLIP(I1, I2_m) + CLIP(T1, T2_m)]."""
    vlm = tiny_vlm(seed=7)
    with torch.no_grad():  # make the momentum branch differ from the online one
        for p in vlm.image_global_m.parameters():
            p.mul_(0.5)
    vlm.eval()  # no dropout: the reference below sees the same features
    batch = make_batch(1)
    loss, logs = build_pretrain_objective("dusss", PretrainObjectiveConfig(sss=False))(vlm, batch)
    tau = vlm.temperature()
    i1, t1 = vlm.encode_image(batch["image"])["global"], vlm.encode_text(batch["text"])["global"]
    i2 = vlm.encode_image(batch["image_aug"], momentum=True)["global"]
    t2 = vlm.encode_text(batch["text_aug"], momentum=True)["global"]
    cmc = 0.5 * (clip_loss(i1, t2, tau) + clip_loss(t1, i2, tau))
    imc = 0.5 * (clip_loss(i1, i2, tau) + clip_loss(t1, t2, tau))
    assert abs(logs["loss_cmc"] - float(cmc)) < 1e-5
    assert abs(float(loss) - float(cmc + imc)) < 1e-5


def test_detach_sss_gives_no_gradient_to_pdt() -> None:
    vlm = tiny_vlm()
    loss, _ = build_pretrain_objective("dusss", PretrainObjectiveConfig(detach_sss=True))(vlm, make_batch())
    loss.backward()
    assert all(p.grad is None for p in vlm.pdt_image.parameters())


def test_optional_terms_and_registry() -> None:
    vlm = tiny_vlm()
    cfg = PretrainObjectiveConfig(imc_local_weight=0.2, w2_infonce_weight=0.1, vib_weight=0.01)
    loss, logs = build_pretrain_objective("dusss", cfg)(vlm, make_batch())
    assert {"loss_g2l", "loss_w2", "loss_vib"} <= set(logs) and math.isfinite(float(loss.detach()))
    with pytest.raises(ConfigError):
        build_pretrain_objective("mgca")
    with pytest.raises(ConfigError):
        PretrainObjectiveConfig(sss_lambda=-1.0)


def test_retrieval_at_k_hand_example() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 1.0]])
    # cos rows (images): img0 -> [0.995, 1.0, 0.707]: own text 2nd (R@1 miss); img1 -> [0.0995, 0, 0.707]: own
    # text 3rd; img2 -> [0.774, 0.707, 1.0]: hit. i2t R@1 = 1/3; R@5 = 1.
    # columns (texts): t0 -> [0.995, 0.0995, 0.774] hit; t1 -> [1, 0, 0.707] 3rd; t2 -> [0.707, 0.707, 1] hit.
    r = retrieval_at_k(img, txt, ks=(1, 2, 5))
    assert r["i2t_R@1"] == pytest.approx(100 / 3) and r["i2t_R@2"] == pytest.approx(200 / 3)
    assert r["i2t_R@5"] == 100.0
    assert r["t2i_R@1"] == pytest.approx(200 / 3) and r["mean_R@1"] == pytest.approx(50.0)
    # Rows 0 and 1 share one report: img0's best correct text is t1 (1.0) -> hit; img1's best correct text is
    # t0 (0.0995) with t2 (0.707) above it -> still a miss; img2 hit. i2t R@1 = 2/3.
    r = retrieval_at_k(img, txt, ks=(1,), groups=["a", "a", "b"])
    assert r["i2t_R@1"] == pytest.approx(200 / 3)
    # Ties count against: a collapsed model (every image and text the same vector) retrieves nothing.
    same = torch.ones(3, 2)
    assert retrieval_at_k(same, same, ks=(1, 2, 3))["mean_R@1"] == 0.0
    assert retrieval_at_k(same, same, ks=(3,))["i2t_R@3"] == 100.0  # 2 wrong candidates < 3
    # Identical texts of one report tie among themselves only, which is no miss: all rows hit.
    two_points = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    r = retrieval_at_k(two_points, two_points, ks=(1,), groups=["a", "a", "b"])
    assert r["i2t_R@1"] == 100.0 and r["t2i_R@1"] == 100.0


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = torch.load(Path(out_dir) / "inputs.pt")
        sl = slice(rank * 3, rank * 3 + 3)
        leaves = {k: v[sl].clone().requires_grad_(True) for k, v in data.items()}
        loss, _, _ = contrastive_pair(leaves["x"], leaves["y"], torch.tensor(0.1), (leaves["mx"], leaves["sx"]),
                                      (leaves["my"], leaves["sy"]), PretrainObjectiveConfig())
        loss.backward()
        torch.save({"loss": loss.detach(), **{k: v.grad for k, v in leaves.items()}},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_distributed_gather_matches_single_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    data = {"x": F.normalize(torch.randn(6, 4, generator=g), dim=-1), "y": F.normalize(torch.randn(6, 4, generator=g), dim=-1),
            "mx": torch.randn(6, 3, generator=g), "sx": torch.rand(6, 3, generator=g) + 0.5,
            "my": torch.randn(6, 3, generator=g), "sy": torch.rand(6, 3, generator=g) + 0.5}
    torch.save(data, tmp_path / "inputs.pt")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    leaves = {k: v.clone().requires_grad_(True) for k, v in data.items()}
    loss, _, _ = contrastive_pair(leaves["x"], leaves["y"], torch.tensor(0.1), (leaves["mx"], leaves["sx"]),
                                  (leaves["my"], leaves["sy"]), PretrainObjectiveConfig())
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, res in enumerate(ranks):
        assert torch.allclose(res["loss"], loss.detach(), atol=1e-6)  # every rank scores the global batch
        for k in data:
            # gather_with_grad's backward sums the slice's gradient over the 2 ranks; averaging parameter
            # gradients over ranks (DDP / sync_gradients) then gives exactly the single-process gradient.
            assert torch.allclose(res[k] / 2, leaves[k].grad[r * 3: r * 3 + 3], atol=1e-6)


@pytest.mark.parametrize("name,sss", [("dusss", True), ("dusss", False), ("amvlm", True), ("clip", True)])
def test_short_toy_training_learns_pairs(name: str, sss: bool) -> None:
    """8 colours <-> 8 colour words, 40 steps: image->text R@1 on fresh views far above chance (12.5 %).

    The BatchNorm heads are scored with batch statistics: their running statistics lag a run this short and
    this fast. The tiny text model needs dropout 0 (BERT's 0.1 drowns a 16-wide model)."""
    torch.manual_seed(1)
    vlm = VisionLanguageModel(VLMConfig(
        image=ImageEncoderConfig(image_size=32, hidden_size=16, num_layers=1, num_heads=2),
        text=TextEncoderConfig(random_init=True, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32,
                               dropout=0.0),
        embed_dim=8, head_hidden=16, pdt_heads=2,
    ))
    colours = torch.rand(8, 3, generator=torch.Generator().manual_seed(5))
    words = ["red", "green", "blue", "yellow", "black", "white", "pink", "brown"]
    objective = build_pretrain_objective(name, PretrainObjectiveConfig(sss=sss))
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)

    def views(idx: torch.Tensor) -> torch.Tensor:
        return (colours[idx][:, :, None, None] + 0.05 * torch.randn(len(idx), 3, 32, 32, generator=g)).clamp(0, 1)

    losses = []
    for _ in range(40):
        idx = torch.randperm(8, generator=g)
        text = [words[i] for i in idx]
        loss, _ = objective(vlm, {"image": views(idx), "image_aug": views(idx), "text": text, "text_aug": text})
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        vlm.update_momentum()
    assert sum(losses[-5:]) < sum(losses[:5])
    idx = torch.arange(8)
    with torch.no_grad():
        r = retrieval_at_k(vlm.encode_image(views(idx))["global"], vlm.encode_text(words)["global"], ks=(1,))
    assert r["i2t_R@1"] >= 50.0
