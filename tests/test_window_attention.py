"""SwinV2 window attention: the SDPA path against the explicit reference and against timm's implementation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pipeline.model.layers.window_attention as wa
from pipeline.model.layers import (
    SwinV2Block,
    WindowAttention,
    reference_window_attention,
    window_partition,
    window_reverse,
)

DIM, HEADS = 32, 2


def make_block(shift: int = 0, seed: int = 0, window: int = 8) -> SwinV2Block:
    """A tiny block with non-trivial weights (random logit scales, q/v biases, CPB)."""
    torch.manual_seed(seed)
    block = SwinV2Block(DIM, HEADS, window_size=window, shift_size=shift)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return block


def reference_block(block: SwinV2Block, x: torch.Tensor) -> torch.Tensor:
    """The block's forward with the explicit (timm-style) attention in place of SDPA."""
    H, W = x.shape[1:3]
    window, shift = block.window_and_shift(H, W)
    Hp, Wp = -(-H // window[0]) * window[0], -(-W // window[1]) * window[1]
    y = torch.roll(F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H)), (-shift[0], -shift[1]), (1, 2))
    mask = wa.window_attention_mask(H, W, window, shift, x.device)
    y = reference_window_attention(block.attn, window_partition(y, window), mask, window)
    y = torch.roll(window_reverse(y, window, Hp, Wp), shift, (1, 2))[:, :H, :W]
    x = x + block.norm1(y)
    return x + block.norm2(block.mlp(x))


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    """Max abs error relative to the largest entry of each gradient (parameter grads are sums over tokens)."""
    for name, ref in want.items():
        err = (got[name] - ref).abs().max().item()
        assert err <= tol * ref.abs().max().item() + 1e-7, f"{name}: {err:.3g} vs scale {ref.abs().max().item():.3g}"


def grads(module: torch.nn.Module, x: torch.Tensor, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    return out.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in module.named_parameters()}}


@pytest.mark.parametrize("window", [8, (4, 6)])
def test_partition_reverse_round_trip(window) -> None:
    x = torch.randn(2, 16, 24, 5)
    windows = window_partition(x, window)
    wh, ww = (window, window) if isinstance(window, int) else window
    assert windows.shape == (2 * (16 // wh) * (24 // ww), wh * ww, 5)
    assert torch.equal(windows[0], x[0, :wh, :ww].reshape(-1, 5))  # first window = top-left block, row-major
    assert torch.equal(window_reverse(windows, window, 16, 24), x)


@pytest.mark.parametrize(
    "size, shift",
    [((16, 16), 0), ((16, 16), 4), ((13, 21), 0), ((13, 21), 4), ((5, 7), 4), ((4, 20), 4), ((19, 8), 4)],
)
@pytest.mark.parametrize("explicit_cpu_backward", [True, False])
def test_block_matches_reference_forward_and_backward(size, shift, explicit_cpu_backward, monkeypatch) -> None:
    monkeypatch.setattr(wa, "EXPLICIT_CPU_BACKWARD", explicit_cpu_backward)  # False: grads through SDPA itself
    block = make_block(shift)
    x = torch.randn(2, *size, DIM)
    out, g = grads(block, x, block)
    ref_out, ref_g = grads(block, x, lambda t: reference_block(block, t))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert_grads_close(g, ref_g)
    with torch.no_grad():  # inference: the fused SDPA kernel
        torch.testing.assert_close(block(x), ref_out, atol=1e-5, rtol=1e-5)


def test_attention_matches_timm_swinv2() -> None:
    timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
    torch.manual_seed(0)
    theirs = timm_v2.WindowAttention(DIM, (8, 8), HEADS)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    ours = WindowAttention(DIM, HEADS, 8)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same parameter names
    x = torch.randn(8, 64, DIM)
    mask = wa.window_attention_mask(16, 16, (8, 8), (4, 4))  # (4, 64, 64)
    for m in (None, mask):
        torch.testing.assert_close(ours(x, m), theirs(x, m), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, m), theirs(x, m), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [0, 4])
def test_block_matches_timm_swinv2_block(shift) -> None:
    timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
    torch.manual_seed(0)
    theirs = timm_v2.SwinTransformerV2Block(DIM, (16, 16), HEADS, window_size=8, shift_size=shift)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = SwinV2Block(DIM, HEADS, window_size=8, shift_size=shift)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 16, 16, DIM)
    out, g = grads(ours, x, ours)
    ref_out, ref_g = grads(theirs, x, theirs)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)  # timm masks with -100, we with -1e4
    assert_grads_close(g, ref_g)


def test_shift_mask_blocks_cross_region_attention() -> None:
    block = make_block(shift=4).eval()
    x = torch.randn(1, 16, 16, DIM)
    # After the (-4, -4) roll, (0, 0) and (13, 13) share the bottom-right window but lie in different regions.
    for pos, same_region in (((13, 13), False), ((3, 3), True)):
        x2 = x.clone()
        x2[0, pos[0], pos[1]] += 5.0
        with torch.no_grad():
            changed = not torch.allclose(block(x)[0, 0, 0], block(x2)[0, 0, 0], atol=1e-6)
        assert changed == same_region, pos


def test_padding_gives_the_unpadded_result() -> None:
    block = make_block(shift=0).eval()
    x = torch.randn(2, 12, 12, DIM)  # padded to 16 x 16; windows hold 8x8, 8x4, 4x8, 4x4 real tokens
    with torch.no_grad():
        out = block(x)
        for rows, cols in ((slice(0, 8), slice(0, 8)), (slice(8, 12), slice(0, 8)), (slice(8, 12), slice(8, 12))):
            # a 4 x 8 map is one unpadded (4, 8) window: same tokens, same relative position bias
            torch.testing.assert_close(out[:, rows, cols], block(x[:, rows, cols]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [0, 4])
def test_padded_keys_get_no_attention_weight(shift) -> None:
    block = make_block(shift=shift)
    H, W = 11, 13
    window, sh = block.window_and_shift(H, W)
    mask = wa.window_attention_mask(H, W, window, sh)
    y = torch.roll(F.pad(torch.randn(1, H, W, DIM), (0, 0, 0, 16 - W, 0, 16 - H)), (-sh[0], -sh[1]), (1, 2))
    real = torch.zeros(1, 16, 16, 1)
    real[:, :H, :W] = 1
    real = window_partition(torch.roll(real, (-sh[0], -sh[1]), (1, 2)), window)[..., 0].bool()  # (nW, N)
    _, weights = reference_window_attention(block.attn, window_partition(y, window), mask, return_weights=True)
    to_pad = weights.masked_select(real[:, None, :, None] & ~real[:, None, None, :])  # real query -> pad key
    assert to_pad.numel() > 0 and torch.all(to_pad == 0)


def test_small_maps_use_one_unshifted_window() -> None:
    block = make_block(shift=4)
    assert block.window_and_shift(5, 7) == ((5, 7), (0, 0))
    assert block.window_and_shift(4, 20) == ((4, 8), (0, 4))
    assert block.attn_mask(5, 7, torch.device("cpu")) is None  # exact fit: no mask at all
    assert block(torch.randn(1, 1, 1, DIM)).shape == (1, 1, 1, DIM)


def test_bf16_autocast_runs() -> None:
    block = make_block(shift=4)
    x = torch.randn(2, 13, 21, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())
    err = (out.float() - block(x).detach()).abs()
    assert err.mean() < 0.02 and err.max() < 0.25  # outputs ~1.4 in magnitude; timm's bf16 error is the same size


def test_torch_compile_without_graph_breaks() -> None:
    block = make_block(shift=4)
    x = torch.randn(2, 13, 21, DIM)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)  # inductor: see benchmarks/
    out, g = grads(block, x, compiled)
    ref_out, ref_g = grads(block, x, block)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert_grads_close(g, ref_g)
