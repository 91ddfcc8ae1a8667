"""The backbone runs under torch.compile and gives the eager result, with global and with local context."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import ModalityInput, create_model

MICRO = {"dims": (32, 64, 96, 128), "depths": (2, 2, 1, 1), "moe_blocks": 1, "fusion_dim": 64, "fusion_heads": 2}


@pytest.mark.slow
@pytest.mark.parametrize("context_radius", [None, 2])
def test_compiled_model_matches_eager(context_radius: int | None) -> None:
    torch.manual_seed(0)
    model = create_model("skysense_v2_tiny", context_radius=context_radius, **MICRO).eval()
    inputs = {
        "s2": ModalityInput(torch.randn(1, 2, 10, 16, 16), doy=torch.tensor([[30, 60]])),
        "s1": ModalityInput(torch.randn(1, 2, 2, 16, 16), doy=torch.tensor([[31, 61]])),
    }
    with torch.no_grad():
        eager = model(inputs)
        compiled = torch.compile(model)(inputs)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
