"""Geo-alignment and masking invariants of the on-device multi-view augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.modalities import DEFAULT_MODALITIES
from pipeline.model import ModalityInput
from pipeline.ssl.augment import CropGeometry, MultiViewAugment, apply_dihedral

SPECS = tuple(DEFAULT_MODALITIES.values())
R_HR = 16  # 0.625 m HR pixels per 10 m grid cell


def _geometric_only(**kw: object) -> MultiViewAugment:
    """No photometric change and no masking: values survive, so positions can be read back."""
    args = {"p_color": 0.0, "p_speckle": 0.0, "date_drop": 0.0, "modality_drop": 0.0, "num_local": 2}
    args.update(kw)
    return MultiViewAugment(SPECS, **args)  # type: ignore[arg-type]


def _coordinate_batch(B: int = 3, G: int = 6, T: int = 2) -> dict[str, ModalityInput]:
    """Every pixel encodes (sample, grid row, grid col) of the 10 m cell it lies in."""
    rows = torch.arange(G)
    cell = torch.stack(torch.meshgrid(rows, rows, indexing="ij")).float()  # (2, G, G)
    b = torch.arange(B, dtype=torch.float)[:, None, None, None].expand(B, 1, G, G)
    code = torch.cat([b, cell.expand(B, 2, G, G)], 1)  # (B, 3, G, G)
    hr = code.repeat_interleave(R_HR, -1).repeat_interleave(R_HR, -2)  # (B, 3, G*16, G*16)
    s2 = torch.cat([code, torch.zeros(B, 7, G, G)], 1)
    return {
        "hr": ModalityInput(hr[:, None], gsd=0.625),
        "s2": ModalityInput(s2[:, None].expand(B, T, 10, G, G).clone(), doy=torch.ones(B, T, dtype=torch.long)),
        "s1": ModalityInput(code[:, 1:][:, None].expand(B, T, 2, G, G).clone()),
    }


def test_rotate_then_unrotate_is_identity() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5)
    t = torch.arange(8)
    y = apply_dihedral(x, t)
    inverse = torch.where(t < 4, (4 - t) % 4, t)  # rotations invert by the opposite turn; reflections are involutions
    torch.testing.assert_close(apply_dihedral(y, inverse), x)
    # The index-map crop of a full-tile window is exactly torch.rot90/flip.
    geom = CropGeometry(torch.zeros(8, 2, dtype=torch.long), 5, t, (5, 5))
    torch.testing.assert_close(geom.crop(x[:, None], 1)[:, 0], y)
    # Back on the canvas: the identity where the view lies.
    canvas, mask = geom.to_canvas(y)
    assert mask.all()
    torch.testing.assert_close(canvas, x)


def test_crop_on_canvas_restores_source_inside_the_box() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 2, 7, 9)
    geom = CropGeometry(torch.tensor([[0, 0], [3, 5], [2, 1], [4, 0]]), 3, torch.tensor([0, 3, 5, 7]), (7, 9))
    view = geom.crop(x[:, None], 1)[:, 0]
    canvas, mask = geom.to_canvas(view)
    assert mask.sum((1, 2)).tolist() == [9] * 4
    torch.testing.assert_close(canvas[mask[:, None].expand_as(canvas)], x[mask[:, None].expand_as(x)])
    other = CropGeometry(torch.tensor([[1, 1], [0, 0], [2, 1], [0, 5]]), 4, torch.zeros(4, dtype=torch.long), (7, 9))
    box = geom.overlap_box(other)  # (row0, col0, row1, col1)
    assert box.tolist() == [[1, 1, 3, 3], [3, 5, 4, 4], [2, 1, 5, 4], [4, 5, 4, 3]]  # last two: full / empty
    _, mask_other = other.to_canvas(torch.zeros(4, 1, 4, 4))
    areas = ((box[:, 2] - box[:, 0]).clamp_min(0) * (box[:, 3] - box[:, 1]).clamp_min(0)).tolist()
    assert (mask & mask_other).sum((1, 2)).tolist() == areas
    coords = geom.source_coords()  # (B, n, n, 2)
    torch.testing.assert_close(x[torch.arange(4)[:, None, None], :, coords[..., 0], coords[..., 1]].permute(0, 3, 1, 2),
                               view)  # fmt: skip


def test_all_modalities_of_a_view_cover_the_same_footprint() -> None:
    batch = _coordinate_batch()
    aug = _geometric_only(global_scale=(0.5, 0.5), local_scale=(0.2, 0.2))
    glob, loc = aug(batch, torch.Generator().manual_seed(3))
    for group in (glob, loc):
        assert group is not None
        n, B = group.geometry.size, group.batch_size
        coords = group.geometry.source_coords()  # (V*B, n, n, 2)
        s2 = group.inputs["s2"].x[:, 0, :3]  # (V*B, 3, n, n)
        s1 = group.inputs["s1"].x[:, 0]
        hr = group.inputs["hr"].x[:, 0]  # (V*B, 3, n*16, n*16)
        assert hr.shape[-1] == n * R_HR and s2.shape[-1] == n
        sample = torch.arange(group.num_views * B) % B
        torch.testing.assert_close(s2[:, 0], sample[:, None, None].float().expand(-1, n, n))
        torch.testing.assert_close(s2[:, 1:], coords.permute(0, 3, 1, 2).float())
        torch.testing.assert_close(s1, s2[:, 1:])
        # Every 16 x 16 HR block carries the code of the S2 cell at the same view position.
        blocks = hr.view(-1, 3, n, R_HR, n, R_HR)
        torch.testing.assert_close(blocks, s2[:, :, :, None, :, None].expand_as(blocks))
    assert {glob.num_views, loc.num_views} == {2}  # type: ignore[union-attr]
    assert glob.geometry.size > loc.geometry.size  # type: ignore[union-attr]


def test_date_subsets_and_modality_dropout_keep_data() -> None:
    batch = _coordinate_batch(B=16, T=4)
    aug = MultiViewAugment(SPECS, num_local=0, date_drop=1.0, modality_drop=1.0)
    glob, _ = aug(batch, torch.Generator().manual_seed(0))
    has = {m: inp.valid.flatten(1).any(1) for m, inp in glob.inputs.items()}  # (V*B,) per modality
    alive = torch.stack(list(has.values()), 1)
    assert (alive.sum(1) == 1).all()  # never all modalities dropped; with p=1 exactly one survives
    for m in ("s2", "s1"):
        kept_dates = glob.inputs[m].valid.sum(1)  # (V*B,)
        assert ((kept_dates == 1) | ~has[m]).all()  # date_drop=1: one date kept where the modality is kept

    mild = MultiViewAugment(SPECS, num_local=0, date_drop=0.5, modality_drop=0.0)
    glob, _ = mild(batch, torch.Generator().manual_seed(1))
    counts = glob.inputs["s2"].valid.sum(1)
    assert counts.min() >= 1 and counts.max() <= 4 and glob.inputs["hr"].valid.all()


def test_pixel_validity_is_cropped_with_the_data() -> None:
    batch = _coordinate_batch(B=2, G=4, T=2)
    valid = torch.ones(2, 2, 4, 4, dtype=torch.bool)
    valid[:, :, 0, :] = False  # source row 0 is nodata
    x = batch["s2"].x.clone()
    x[:, :, :, 0, :] = float("nan")  # nodata pixels may arrive as NaN
    batch["s2"] = ModalityInput(x, doy=batch["s2"].doy, valid=valid)
    glob, _ = _geometric_only(num_local=0, p_color=1.0)(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(glob.inputs["s2"].x).all()
    rows = glob.geometry.source_coords()[..., 0]  # (V*B, n, n)
    assert torch.equal(glob.inputs["s2"].valid[:, 0], rows != 0)


def test_speckle_is_log_gamma_in_db_and_colour_jitter_spares_sar() -> None:
    L, G = 4, 32
    batch = {"s1": ModalityInput(torch.zeros(2, 1, 2, G, G)), "s2": ModalityInput(torch.zeros(2, 1, 10, G, G))}
    aug = MultiViewAugment(SPECS, num_local=0, global_scale=(1.0, 1.0), p_speckle=1.0, speckle_looks=L,
                           p_color=0.0, date_drop=0.0, modality_drop=0.0)  # fmt: skip
    glob, _ = aug(batch, torch.Generator().manual_seed(0))
    db = glob.inputs["s1"].x * torch.tensor(DEFAULT_MODALITIES["s1"].std)[:, None, None]
    # E[10 log10 G] for G ~ Gamma(L, 1/L) is 10 / ln 10 * (digamma(L) - ln L).
    expected = 10 / math.log(10) * (torch.special.digamma(torch.tensor(float(L))).item() - math.log(L))
    assert db.mean().item() == pytest.approx(expected, abs=0.05)
    assert (glob.inputs["s2"].x == 0).all()


def test_mismatched_footprints_are_rejected() -> None:
    batch = _coordinate_batch(G=6)
    batch["s1"] = ModalityInput(torch.zeros(3, 2, 2, 5, 5))
    with pytest.raises(ValueError, match="different ground extents"):
        _geometric_only()(batch)


def test_photometric_augmentation_follows_the_modality_family() -> None:
    from dataclasses import replace

    from pipeline.modalities import HR, S1, S2

    assert (_geometric_only().optical, _geometric_only().sar) == (("hr", "s2"), ("s1",))
    aug = MultiViewAugment((replace(HR, name="planet"), replace(S1, name="s1_asc"), S2))
    assert aug.optical == ("planet", "s2") and aug.sar == ("s1_asc",)  # facts of the spec, not names
    assert MultiViewAugment(SPECS, optical=(), sar=("s1",)).optical == ()  # explicit choice still possible
