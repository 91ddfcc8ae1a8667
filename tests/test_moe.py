"""Mixture of experts: grouped computation vs the per-expert loop, routing statistics, load-balancing loss."""

from __future__ import annotations

import pytest
import torch

import pipeline.model.layers.moe as moe_mod
from pipeline.model.layers import MoEFeedForward, moe_loop_reference

DIM, HIDDEN, E = 16, 32, 8
STARVED = (2, 5, 7)  # experts that receive no token in `starved_moe`


def starved_moe(top_k: int, seed: int = 0) -> tuple[MoEFeedForward, torch.Tensor]:
    """A layer whose gate never picks the STARVED experts (feature 0 is a constant 1 with logit weight -50)."""
    torch.manual_seed(seed)
    moe = MoEFeedForward(DIM, HIDDEN, num_experts=E, top_k=top_k, aux_loss_weight=1.0)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1.0)
        moe.gate.weight[list(STARVED), 0] = -50.0
    x = torch.randn(3, 37, DIM)
    x[..., 0] = 1.0
    return moe, x


def run(moe: MoEFeedForward, x: torch.Tensor, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    moe.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    return out.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in moe.named_parameters()}}


def assert_same(got, want) -> None:
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for name, ref in want[1].items():
        torch.testing.assert_close(got[1][name], ref, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("backend", ["grouped_mm", "padded_bmm"])
def test_grouped_equals_loop_forward_and_backward(top_k, backend, monkeypatch) -> None:
    if backend == "padded_bmm":
        monkeypatch.setattr(moe_mod, "_GROUPED_MM", None)
    elif moe_mod._GROUPED_MM is None:
        pytest.skip("this torch has no grouped_mm")
    moe, x = starved_moe(top_k)
    got = run(moe, x, moe)
    assert all(moe.tokens_per_expert[e] == 0 for e in STARVED) and (moe.tokens_per_expert > 0).sum() == E - 3
    assert_same(got, run(moe, x, lambda t: moe_loop_reference(moe, t)))
    assert torch.all(got[1]["w1"][list(STARVED)] == 0)  # starved experts get exactly no gradient


@pytest.mark.parametrize("top_k", [1, 2])
def test_cpu_row_slices_equal_loop(top_k, monkeypatch) -> None:
    monkeypatch.setattr(moe_mod, "CPU_CHUNK_BYTES", 0)  # slices of 256 rows: boundaries fall inside experts
    moe, _ = starved_moe(top_k)
    x = torch.randn(600, DIM)
    x[:, 0] = 1.0
    assert_same(run(moe, x, moe), run(moe, x, lambda t: moe_loop_reference(moe, t)))


def test_top2_output_is_renormalised_mix() -> None:
    moe, x = starved_moe(top_k=2)
    x = x.reshape(-1, DIM)[:5]
    _, weights, experts = moe.route(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    with torch.no_grad():
        expert_out = [torch.nn.functional.gelu(x @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e] for e in range(E)]
        expected = torch.stack([sum(weights[t, j] * expert_out[experts[t, j]][t] for j in range(2)) for t in range(5)])
        torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)


def test_token_counts_and_load() -> None:
    moe, x = starved_moe(top_k=1)
    with torch.no_grad():
        moe(x)
        argmax = moe.gate(x.reshape(-1, DIM)).argmax(-1)
    assert moe.tokens_per_expert.dtype == torch.long and moe.tokens_per_expert.sum() == x.shape[0] * x.shape[1]
    assert torch.equal(moe.tokens_per_expert, torch.bincount(argmax, minlength=E))
    assert "tokens_per_expert" in dict(moe.named_buffers()) and "tokens_per_expert" not in dict(moe.named_parameters())
    moe(x[:1])
    assert torch.equal(moe.expert_load, torch.bincount(argmax, minlength=E) + moe.tokens_per_expert)
    moe.reset_load()
    assert moe.expert_load.sum() == 0


def test_aux_loss_known_answers() -> None:
    moe = MoEFeedForward(DIM, HIDDEN, num_experts=E, aux_loss_weight=1.0)
    x = torch.rand(64, DIM) + 0.1  # positive features
    with torch.no_grad():
        moe.gate.weight.zero_()  # uniform gate: P_e = 1/E, so E * sum_e f_e / E = 1 whatever the routing
    moe(x)
    torch.testing.assert_close(moe.aux_loss, torch.tensor(1.0))
    with torch.no_grad():
        moe.gate.weight[0] = 100.0  # every token to expert 0 with probability 1: f = P = e_0, loss = E
    moe(x)
    torch.testing.assert_close(moe.aux_loss, torch.tensor(float(E)))
    moe.aux_loss_weight = 0.01
    moe(x)
    torch.testing.assert_close(moe.aux_loss, torch.tensor(0.01 * E))


def test_aux_loss_balanced_routing_and_gradient() -> None:
    moe = MoEFeedForward(DIM, HIDDEN, num_experts=4, aux_loss_weight=1.0)
    x = torch.eye(4, DIM).repeat(8, 1)  # token type i -> expert i: f_e = 1/4 exactly
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, :4] = 3.0 * torch.eye(4)
    moe.eval()(x)  # computed in eval too
    assert torch.equal(moe.tokens_per_expert, torch.full((4,), 8))
    torch.testing.assert_close(moe.aux_loss, torch.tensor(1.0))  # f_e = 1/E: E * sum_e P_e / E = 1
    moe.aux_loss.backward()
    assert moe.gate.weight.grad is not None


@pytest.mark.parametrize("shape", [(DIM,), (5, DIM), (2, 3, 4, DIM)])
def test_any_leading_shape(shape) -> None:
    moe, _ = starved_moe(top_k=1)
    x = torch.randn(shape)
    out = moe(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(-1, DIM), moe(x.reshape(-1, DIM)))


def test_bf16_autocast_runs() -> None:
    moe, x = starved_moe(top_k=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.isfinite(moe.w1.grad).all() and moe.aux_loss.dtype == torch.float32
    torch.testing.assert_close(out.float(), moe(x).detach(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile(dtype) -> None:
    moe, x = starved_moe(top_k=1)
    moe, x = moe.to(dtype), x.to(dtype)
    compiled = torch.compile(moe, backend="aot_eager")  # fp32 on CPU graph-breaks into the padded fallback
    got = run(moe, x, compiled)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    want = run(moe, x, moe)
    torch.testing.assert_close(got[0], want[0], atol=tol, rtol=tol)
    torch.testing.assert_close(got[1]["w1"], want[1]["w1"], atol=tol, rtol=tol)
    assert moe.tokens_per_expert.sum() == x.shape[0] * x.shape[1]
