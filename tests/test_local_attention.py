"""Local-context attention of stages 3-4: blocked computation vs a dense reference, locality, model wiring."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import create_model
from pipeline.model.layers.local_attention import LocalGrid, local_attention, reference_local_attention
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
    model = create_model("skysense_v2_tiny", **MICRO).eval()
    x = torch.randn(1, 1, 10, 96, 96)

    def run(crop: torch.Tensor, radius: int | None) -> torch.Tensor:
        model.backbone.set_context_radius(radius)
        with torch.no_grad():
            return model({"s2": ModalityInput(crop)})

    a, b = run(x[..., :80, :80], 4), run(x[..., 16:96, 16:96], 4)
    centre_a, centre_b = a[..., 40:56, 40:56], b[..., 24:40, 24:40]  # the same ground, >= 24 px from every edge
    torch.testing.assert_close(centre_a, centre_b, rtol=0, atol=1e-4 * a.abs().max().item())
    g_a, g_b = run(x[..., :80, :80], None), run(x[..., 16:96, 16:96], None)
    assert (g_a[..., 40:56, 40:56] - g_b[..., 24:40, 24:40]).abs().max() > 1e-3 * g_a.abs().max()
    with pytest.raises(ValueError, match="radius"):
        model.backbone.set_context_radius(0)
