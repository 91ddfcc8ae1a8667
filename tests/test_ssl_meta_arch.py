"""The pre-training meta-architecture on a tiny model: losses, gradients, teacher EMA, learning on a fixed batch."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import ModalityInput, create_model
from pipeline.ssl import MultiViewAugment, SSLMetaArch

MICRO = {"dims": (32, 64, 96, 128), "depths": (1, 1, 1, 1), "fusion_dim": 64, "fusion_heads": 2}
COMPONENTS = ("loss_qsacl", "loss_mgcl_pixel", "loss_mgcl_object", "loss_mgcl_image", "loss_gcpl", "loss_moe")


def _meta(seed: int = 0, num_regions: int = 2) -> SSLMetaArch:
    torch.manual_seed(seed)
    model = create_model("skysense_v2_tiny", **MICRO)
    aug = MultiViewAugment(model.config.modalities, num_global=2, num_local=2, global_scale=(0.5, 1.0),
                           local_scale=(0.25, 0.25))  # fmt: skip
    return SSLMetaArch(model, num_queries=4, proj_dim=32, head_hidden_dim=64, query_heads=2, augment=aug,
                       max_pixels=256, region_size=2, num_regions=num_regions, num_prototypes=4)  # fmt: skip


def _batch(B: int = 4, T: int = 2, G: int = 4, hr: bool = True) -> dict[str, ModalityInput]:
    g = torch.Generator().manual_seed(0)
    batch = {
        "s2": ModalityInput(torch.randn(B, T, 10, G, G, generator=g), doy=torch.randint(1, 366, (B, T), generator=g)),
        "s1": ModalityInput(torch.randn(B, T, 2, G, G, generator=g), doy=torch.randint(1, 366, (B, T), generator=g)),
    }
    if hr:  # 0.625 m: 16 px per 10 m grid cell
        batch["hr"] = ModalityInput(torch.randn(B, 1, 3, G * 16, G * 16, generator=g), gsd=0.625)
    return batch


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threading overhead dominates on 2 shared cores
    yield
    torch.set_num_threads(threads)


def test_forward_backward_grads_reach_the_student_only() -> None:
    meta = _meta()
    out = meta(_batch(), region=torch.tensor([0, 1, 1, 0]), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    for k in COMPONENTS:
        assert out[k].ndim == 0 and torch.isfinite(out[k]) and not out[k].requires_grad, k
    assert out["loss_qsacl"] > 0 and out["loss_mgcl_pixel"] > 0 and out["loss_moe"] > 0
    load = out["expert_load"]
    assert load.shape == (2, 8)  # 2 MoE layers x 8 experts
    torch.testing.assert_close(load.sum(-1), torch.ones(2))
    out["loss"].backward()
    student = meta.student_modules
    grads = {n: p.grad for n, p in student.named_parameters()}
    for part in ("model.backbone.tokenizers.hr", "model.backbone.tokenizers.s1", "model.fusion.blocks",
                 "dense_head", "image_head", "modal_head", "query_decoder", "query_head"):  # fmt: skip
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(part)), part
    gate = student.model.backbone.stages[2][0].mlp.gate.weight.grad
    assert gate is not None and gate.abs().sum() > 0  # the load-balancing term reaches the router
    assert all(p.grad is None and not p.requires_grad for p in meta.teacher_modules.parameters())
    assert not meta.teacher_modules.training and meta.training


def test_any_subset_of_modalities_and_no_local_views() -> None:
    meta = _meta()
    meta.augment.num_local = 0  # QSACL then pairs the two global views
    with torch.no_grad():
        out = meta({"s2": _batch(hr=False)["s2"]}, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    assert out["mgcl_cross"] == 0  # a single modality has no cross-modal pairs


def test_update_teacher_and_fixed_batch_learning() -> None:
    meta = _meta(seed=1)
    batch = _batch()
    params = list(meta.student_modules.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(4):
        out = meta(batch, generator=torch.Generator().manual_seed(0))  # the same views every step
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        meta.update_teacher(0.5)
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0], losses
    meta.update_teacher(0.0)  # momentum 0: the teacher becomes the student
    for t, s in zip(meta.teacher_modules.parameters(), params):
        torch.testing.assert_close(t, s)


def _changed_regions(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    return {r for r in range(before.shape[0]) if not torch.equal(before[r], after[r])}


def test_gcpl_gets_each_samples_region() -> None:
    """A batch mixing regions moves the prototypes of exactly those regions; no region = unknown location."""
    meta = _meta(num_regions=6)
    before = meta.gcpl.prototypes.clone()
    with torch.no_grad():
        meta(_batch(), region=torch.tensor([0, 3, 3, 0]), generator=torch.Generator().manual_seed(0))
    assert _changed_regions(before, meta.gcpl.prototypes) == {0, 3}
    before = meta.gcpl.prototypes.clone()
    with torch.no_grad():
        meta(_batch(), generator=torch.Generator().manual_seed(1))
    assert _changed_regions(before, meta.gcpl.prototypes) == {5}  # the unknown-location prototypes only


@pytest.mark.parametrize(
    ("region", "match"),
    [
        (torch.tensor([0, 6, 1, 1]), r"region ids must lie in \[0, 6\).*got 0\.\.6"),
        (torch.tensor([0, -1, 1, 1]), r"must lie in \[0, 6\)"),
        (torch.tensor([0, 1]), r"\(B,\) = \(4,\)"),
        (torch.tensor([0.0, 1.0, 1.0, 1.0]), "integer"),
    ],
)
def test_bad_region_ids_are_a_clear_error(region: torch.Tensor, match: str) -> None:
    meta = _meta(num_regions=6)
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        meta(_batch(), region=region, generator=torch.Generator().manual_seed(0))
