"""Local-context attention of stages 3-4: blocked computation vs a dense reference, locality, model wiring."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from pipeline.model import create_model
from pipeline.model.layers.attention import Attention, Block, LocalAttention
from pipeline.model.layers.local_attention import LocalGrid, TokenGrid, local_attention, reference_local_attention
from pipeline.model.skysense import ModalityInput

MICRO = {"dims": (32, 64, 96, 128), "depths": (1, 1, 1, 1), "fusion_dim": 64, "fusion_heads": 2}


@pytest.mark.parametrize(
    ("h", "w", "prompts", "radius", "block"), [(13, 11, 4, 3, 8), (16, 16, 0, 8, 16), (5, 7, 4, 2, 4), (20, 9, 2, 5, 8)]
)
def test_blocked_local_attention_equals_dense_masked_reference(h, w, prompts, radius, block):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, prompts + h * w, 16) for _ in range(3))
    grid = LocalGrid(h, w, prompts, radius, block)
    torch.testing.assert_close(local_attention(q, k, v, grid), reference_local_attention(q, k, v, grid))


def test_a_token_sees_only_its_neighbourhood():
    torch.manual_seed(0)
    h = w = 24
    q, k, v = (torch.randn(1, 2, 4 + h * w, 8) for _ in range(3))
    grid = LocalGrid(h, w, 4, radius=3)
    base = local_attention(q, k, v, grid)
    v2 = v.clone()
    v2[:, :, 4 + 12 * w + 12] += 10.0  # change the value of token (12, 12)
    moved = (local_attention(q, k, v2, grid) - base).abs().amax(dim=(0, 1, 3))[4:].reshape(h, w)
    changed = torch.nonzero(moved > 0)
    assert changed[:, 0].min() == 9 and changed[:, 0].max() == 15  # exactly the 7 x 7 neighbourhood
    assert changed[:, 1].min() == 9 and changed[:, 1].max() == 15
    assert (local_attention(q, k, v2, grid) - base)[:, :, :4].abs().max() == 0  # prompts never see tokens


def test_model_output_is_translation_equivariant_away_from_the_edges():
    """Shifting the input by a multiple of the window shifts the local-context output; global context does not."""
    torch.manual_seed(0)
    local = create_model("skysense_v2_tiny", context_radius=4, **MICRO).eval()
    glob = create_model("skysense_v2_tiny", **MICRO).eval()
    glob.load_state_dict(local.state_dict())  # the same weights serve both contexts
    x = torch.randn(1, 1, 10, 96, 96)

    def run(model: torch.nn.Module, crop: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model({"s2": ModalityInput(crop)})

    a, b = run(local, x[..., :80, :80]), run(local, x[..., 16:96, 16:96])
    centre_a, centre_b = a[..., 40:56, 40:56], b[..., 24:40, 24:40]  # the same ground, >= 24 px from every edge
    torch.testing.assert_close(centre_a, centre_b, rtol=0, atol=1e-4 * a.abs().max().item())
    g_a, g_b = run(glob, x[..., :80, :80]), run(glob, x[..., 16:96, 16:96])
    assert (g_a[..., 40:56, 40:56] - g_b[..., 24:40, 24:40]).abs().max() > 1e-3 * g_a.abs().max()


def test_context_radius_is_a_constructor_argument():
    torch.manual_seed(0)
    local = create_model("skysense_v2_tiny", context_radius=3, **MICRO)
    torch.manual_seed(0)
    glob = create_model("skysense_v2_tiny", **MICRO)
    # same parameters (names and values): the context changes the attention class, not the weights
    assert local.state_dict().keys() == glob.state_dict().keys()
    assert all(torch.equal(v, glob.state_dict()[k]) for k, v in local.state_dict().items())
    prompted = [blk for blocks, p in zip(local.backbone.stages, local.backbone.prompted) if p for blk in blocks]
    assert prompted and all(isinstance(b.attn, LocalAttention) and b.attn.radius == 3 for b in prompted)
    assert all(type(b.attn) is Attention for blocks in glob.backbone.stages[2:] for b in blocks)
    assert all(type(b.attn) is Attention for b in local.fusion.blocks)  # fusion keeps global attention
    with pytest.raises(ValueError, match="radius"):
        create_model("skysense_v2_tiny", context_radius=0, **MICRO)


def test_block_takes_its_attention_class():
    """A radius covering the whole grid makes local attention global: same weights, same output."""
    torch.manual_seed(0)
    glob = Block(32, 4)
    local = Block(32, 4, attn_layer=partial(LocalAttention, radius=7))
    local.load_state_dict(glob.state_dict())
    x = torch.randn(2, 5 * 7, 32)
    grid = TokenGrid(5, 7, prompts=0)
    torch.testing.assert_close(local(x, None, grid), glob(x, None, grid))
    narrow = Block(32, 4, attn_layer=partial(LocalAttention, radius=1))
    narrow.load_state_dict(glob.state_dict())
    assert (narrow(x, None, grid) - glob(x)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="token grid layout"):
        narrow(x)
    with pytest.raises(ValueError, match="no key mask"):
        narrow(x, torch.ones(2, 35, dtype=torch.bool), grid)
