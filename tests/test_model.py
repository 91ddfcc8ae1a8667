"""Tests of the assembled SkySense V2 model: APM, prompts, fusion masking, feature API, parameter counts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pipeline.modalities import BandMismatchError
from pipeline.model import ModalityInput, create_model
from pipeline.model.backbone import SkySenseV2Backbone, StageBlocks, default_stage_blocks
from pipeline.model.config import SkySenseConfig, get_config
from pipeline.model.layers.attention import Block
from pipeline.model.layers.patch_merging import merge_schedule, supported_gsd
from pipeline.model.layers.window_attention import SwinV2Block
from pipeline.model.params import count_parameters

MICRO = {"dims": (32, 64, 96, 128), "depths": (2, 2, 2, 2), "fusion_dim": 64, "fusion_heads": 2}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("skysense_v2_tiny", **MICRO).eval()


def _batch(B: int = 2, T: int = 3, size: int = 16, hr: bool = True, seed: int = 0) -> dict[str, ModalityInput]:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "s2": ModalityInput(
            torch.randn(B, T, 10, size, size, generator=g), doy=torch.randint(1, 366, (B, T), generator=g)
        ),
        "s1": ModalityInput(
            torch.randn(B, T, 2, size, size, generator=g), doy=torch.randint(1, 366, (B, T), generator=g)
        ),
    }
    if hr:
        # 0.625 m HR: patch 4 -> 2.5 m, 2 merges -> 10 m grid, so 16 grid px = 256 HR px.
        inputs["hr"] = ModalityInput(torch.randn(B, 1, 3, size * 16, size * 16, generator=g), gsd=0.625)
    return inputs


def test_merge_schedule_rule() -> None:
    assert merge_schedule(10.0, 1, 10.0) == (False, False, False)
    assert merge_schedule(0.625, 4, 10.0) == (True, True, False)
    assert merge_schedule(0.3125, 4, 10.0) == (True, True, True)
    assert merge_schedule(2.5, 4, 10.0) == (False, False, False)
    with pytest.raises(ValueError, match="resample to one of"):
        merge_schedule(0.5, 4, 10.0)
    assert supported_gsd(0.5, 4, 10.0) == 0.625
    assert supported_gsd(0.3, 4, 10.0) == 0.3125
    assert supported_gsd(4.5, 4, 10.0) == 2.5


def test_feature_api_shapes_and_shared_grid(model: torch.nn.Module) -> None:
    with torch.no_grad():
        inter = model.forward_intermediates(_batch())
    dims = model.config.dims
    # S2/S1 never merge: every stage stays on the 16 x 16 grid.
    assert [tuple(m.shape) for m in inter["s2"]] == [(2, 3, d, 16, 16) for d in dims]
    # HR 256 px at 0.625 m: 64 -> 32 -> 16 -> 16 tokens: stage 3 and 4 on the shared grid.
    assert [tuple(m.shape[-2:]) for m in inter["hr"]] == [(64, 64), (32, 32), (16, 16), (16, 16)]
    assert inter["fused"].shape == (2, model.config.fusion_dim, 16, 16)
    assert inter["valid"].all()
    feats = model.forward_features(_batch())
    assert feats["s1"].shape == (2, 3, dims[-1], 16, 16)
    assert torch.isfinite(feats["fused"]).all()


def test_missing_modality_equals_fully_masked(model: torch.nn.Module) -> None:
    full = _batch(seed=1)
    absent = {k: v for k, v in full.items() if k != "s1"}
    masked = dict(full)
    s1 = full["s1"]
    masked["s1"] = ModalityInput(s1.x * 100, doy=s1.doy, valid=torch.zeros(2, 3, dtype=torch.bool))
    with torch.no_grad():
        a = model(absent)
        b = model(masked)
        c = model(full)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the modality does matter when valid


def test_masked_dates_and_nan_pixels_do_not_leak(model: torch.nn.Module) -> None:
    base = _batch(hr=False, seed=2)
    s2 = base["s2"]
    valid = torch.ones(2, 3, 16, 16, dtype=torch.bool)
    valid[:, 1] = False  # date 1 fully cloudy
    poisoned = s2.x.clone()
    poisoned[:, 1] = float("nan")
    with torch.no_grad():
        a = model({"s2": ModalityInput(s2.x, doy=s2.doy, valid=valid), "s1": base["s1"]})
        b = model({"s2": ModalityInput(poisoned, doy=s2.doy, valid=valid), "s1": base["s1"]})
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_prompt_tokens_are_dropped_and_modality_specific(model: torch.nn.Module) -> None:
    inputs = _batch(hr=False, seed=3)
    with torch.no_grad():
        before = model.forward_intermediates(inputs)
        # Output token count equals the spatial grid: prompts are not part of any stage output.
        assert before["s2"][2].shape[-2:] == (16, 16)
        s2_idx = model.config.modality_names.index("s2")
        saved = model.backbone.prompts[0].detach().clone()
        model.backbone.prompts[0][s2_idx].add_(torch.randn_like(saved[s2_idx]))  # random: LayerNorm cancels constants
        after = model.forward_intermediates(inputs)
        model.backbone.prompts[0].copy_(saved)
    assert (before["s2"][2] - after["s2"][2]).abs().max() > 1e-3  # S2 prompts steer S2 features
    torch.testing.assert_close(before["s1"][3], after["s1"][3])  # ...and nothing else


def test_band_mismatch_names_expected_bands(model: torch.nn.Module) -> None:
    with pytest.raises(BandMismatchError, match=r"B02.*B12.*got 13 band"):
        model({"s2": torch.randn(1, 1, 13, 16, 16)})
    order = ["B03", "B02", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
    with pytest.raises(BandMismatchError, match="expected 10 bands in this order"):
        model({"s2": ModalityInput(torch.randn(1, 1, 10, 16, 16), bands=order)})


def test_grid_mismatch_and_bad_gsd_errors(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="different ground extents"):
        model({"s2": torch.randn(1, 1, 10, 16, 16), "s1": torch.randn(1, 1, 2, 8, 8)})
    with pytest.raises(ValueError, match="resample to one of"):
        model({"hr": ModalityInput(torch.randn(1, 1, 3, 64, 64), gsd=0.5)})
    with pytest.raises(ValueError, match="unknown modalities"):
        model({"s2": torch.randn(1, 1, 10, 16, 16), "landsat": torch.randn(1, 1, 7, 16, 16)})


def test_backward_moe_aux_and_grad_checkpointing() -> None:
    torch.manual_seed(0)
    m = create_model("skysense_v2_tiny", **MICRO)
    inputs = _batch(B=1, T=2, hr=False, seed=4)
    out = m(inputs)
    loss = out.square().mean() + m.moe_aux_loss()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert torch.isfinite(m.moe_aux_loss())
    counts = m.backbone.tokens_per_expert()
    assert len(counts) == 2 and all(c.sum() > 0 for c in counts.values())
    m.zero_grad()
    m.set_grad_checkpointing(True)
    (m(inputs).square().mean() + m.moe_aux_loss()).backward()
    for n, p in m.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)


def test_huge_parameter_counts_match_paper() -> None:
    c = count_parameters(get_config("skysense_v2_huge"))
    assert abs(c.backbone_dense / 661e6 - 1) < 0.02, c
    assert abs(c.backbone_moe / 1.99e9 - 1) < 0.03, c
    assert c.active_per_token < c.total
    assert c.total == c.tokenizers + c.backbone_moe + c.fusion


def test_named_configs_build_on_meta() -> None:
    for name in ("skysense_v2_tiny", "skysense_v2_small", "skysense_v2_base"):
        c = count_parameters(get_config(name))
        assert c.backbone_moe > c.backbone_dense > 0


def test_moe_stats_cover_every_modality_of_a_forward() -> None:
    torch.manual_seed(0)
    m = create_model("skysense_v2_tiny", **MICRO).eval()
    inputs = _batch(B=1, T=2, hr=False, seed=5)
    with torch.no_grad():
        m({"s2": inputs["s2"]})
        aux_s2, counts_s2 = m.moe_aux_loss(), m.backbone.tokens_per_expert()
        m({"s1": inputs["s1"]})
        aux_s1, counts_s1 = m.moe_aux_loss(), m.backbone.tokens_per_expert()
        m(inputs)
        aux_both, counts_both = m.moe_aux_loss(), m.backbone.tokens_per_expert()
    torch.testing.assert_close(aux_both, aux_s2 + aux_s1)
    for name, c in counts_both.items():
        assert torch.equal(c, counts_s2[name] + counts_s1[name])
        # both modalities: B*T = 2 images each of 16 x 16 grid tokens + 4 prompt tokens, top-1
        assert int(c.sum()) == 2 * 2 * (16 * 16 + 4)


def test_unknown_model_name_suggests_the_closest() -> None:
    expected = (
        r"unknown model 'skysense_v2_tinny'; did you mean 'skysense_v2_tiny'\? "
        r"Available: skysense_v2_base, skysense_v2_huge, skysense_v2_small, skysense_v2_tiny$"
    )
    with pytest.raises(ValueError, match=expected):
        get_config("skysense_v2_tinny")
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'; available: skysense_v2_base, "):
        create_model("resnet50")


def _backbone_kwargs(config: SkySenseConfig) -> dict:
    return {
        "modalities": config.modalities, "patch_sizes": config.patch_sizes, "dims": config.dims,
        "depths": config.depths, "num_prompts": config.num_prompts,
    }  # fmt: skip


def test_default_stage_blocks_are_the_built_default() -> None:
    config = get_config("skysense_v2_tiny", **MICRO)
    moe = {"moe_blocks": config.moe_blocks, "num_experts": config.num_experts, "top_k": config.top_k}
    torch.manual_seed(0)
    implicit = SkySenseV2Backbone(**_backbone_kwargs(config), **moe)
    torch.manual_seed(0)
    explicit = SkySenseV2Backbone(**_backbone_kwargs(config), stage_blocks=default_stage_blocks(config.depths, **moe))
    assert implicit.prompted == explicit.prompted == (False, False, True, True)
    a, b = implicit.state_dict(), explicit.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [type(blk).__name__ for blocks in implicit.stages for blk in blocks] == ["SwinV2Block"] * 4 + ["Block"] * 4
    assert [type(blk.mlp).__name__ for blk in implicit.stages[3]] == ["MoEFeedForward"] * 2
    assert type(implicit.stages[2][0].mlp).__name__ == "Mlp"
    with pytest.raises(ValueError, match="reaches into the window-attention stages"):
        default_stage_blocks((2, 2, 1, 1), moe_blocks=3)


def test_stage_blocks_are_injected() -> None:
    """Three window stages and one prompted global stage: prompts follow the stage's flag, not its index."""
    config = get_config("skysense_v2_tiny", **MICRO)

    def window(dim: int, num_heads: int, index: int, drop_path: float) -> torch.nn.Module:
        return SwinV2Block(dim, num_heads, window_size=4, shift_size=2 * (index % 2), drop_path=drop_path)

    def dense(dim: int, num_heads: int, index: int, drop_path: float) -> torch.nn.Module:
        return Block(dim, num_heads, drop_path=drop_path)

    stages = (StageBlocks(window), StageBlocks(window), StageBlocks(window), StageBlocks(dense, prompted=True))
    torch.manual_seed(0)
    backbone = SkySenseV2Backbone(**_backbone_kwargs(config), stage_blocks=stages).eval()
    assert len(backbone.prompts) == 1 and backbone.prompts[0].shape[-1] == config.dims[3]
    assert not backbone.moe_layers()
    x = torch.randn(2, 10, 16, 16)
    with torch.no_grad():
        maps = backbone(x, "s2", 10.0)
        backbone.prompts[0][config.modality_names.index("s2")].add_(torch.randn(4, config.dims[3]))
        moved = backbone(x, "s2", 10.0)
    assert [tuple(m.shape) for m in maps] == [(2, d, 16, 16) for d in config.dims]
    assert torch.equal(moved[2], maps[2])  # stage 3 is a window stage here: no prompts
    assert (moved[3] - maps[3]).abs().max() > 1e-3  # stage 4's prompts steer stage 4
    with pytest.raises(ValueError, match="context_radius selects the attention of the default stage blocks"):
        SkySenseV2Backbone(**_backbone_kwargs(config), stage_blocks=stages, context_radius=4)
    with pytest.raises(ValueError, match="need one each"):
        SkySenseV2Backbone(**_backbone_kwargs(config), stage_blocks=stages[:3])


def test_cli_parser_and_model_config_do_not_import_torch() -> None:
    """``pipeline.model`` loads its torch modules on first use: the CLI's parser (and --help) stays fast."""
    code = (
        "import sys; from pipeline.cli import build_parser; build_parser(); from pipeline.model import get_config;"
        "get_config('skysense_v2_tiny'); assert 'torch' not in sys.modules, 'torch imported';"
        "from pipeline.model import SkySenseV2; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
