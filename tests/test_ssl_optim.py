"""Teacher EMA, schedules and parameter groups of pre-training."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pipeline.model import create_model
from pipeline.ssl.ema import update_ema
from pipeline.ssl.schedules import cosine_lr, momentum_schedule, param_groups, weight_decay_schedule


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def test_ema_momentum_one_keeps_zero_copies_half_averages() -> None:
    teacher, student = _pair()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    t0 = [p.clone() for p in teacher.parameters()]
    s0 = [p.clone() for p in student.parameters()]
    update_ema(teacher.parameters(), student.parameters(), 1.0)
    for p, q in zip(teacher.parameters(), t0):
        torch.testing.assert_close(p, q)
    update_ema(teacher.parameters(), student.parameters(), 0.5)
    for p, a, b in zip(teacher.parameters(), t0, s0):
        torch.testing.assert_close(p, 0.5 * (a + b))
    update_ema(teacher.parameters(), student.parameters(), 0.0)
    for p, q in zip(teacher.parameters(), s0):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="built alike"):
        update_ema(teacher.parameters(), list(student.parameters())[:1], 0.9)


def test_schedules_hit_their_endpoints() -> None:
    kw = {"base_lr": 2e-4, "total_steps": 100, "warmup_steps": 10, "min_lr": 1e-6}
    assert cosine_lr(0, **kw) == 0.0
    assert cosine_lr(5, **kw) == pytest.approx(1e-4)
    assert cosine_lr(10, **kw) == pytest.approx(2e-4)
    assert cosine_lr(100, **kw) == pytest.approx(1e-6)
    assert cosine_lr(1000, **kw) == pytest.approx(1e-6)
    lrs = [cosine_lr(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    assert cosine_lr(55, **kw) == pytest.approx((2e-4 + 1e-6) / 2)
    assert momentum_schedule(0, total_steps=50) == pytest.approx(0.996)
    assert momentum_schedule(50, total_steps=50) == pytest.approx(1.0)
    assert momentum_schedule(25, total_steps=50) == pytest.approx(0.998)
    assert weight_decay_schedule(0, total_steps=10) == pytest.approx(0.04)
    assert weight_decay_schedule(10, total_steps=10) == pytest.approx(0.4)
    assert weight_decay_schedule(3, total_steps=10, base=0.05, final=0.05) == pytest.approx(0.05)


def test_param_groups_by_rule_with_layer_decay() -> None:
    model = create_model("skysense_v2_tiny", dims=(32, 64, 96, 128), depths=(1, 1, 1, 1), fusion_dim=64,
                         fusion_heads=2)  # fmt: skip
    model.fusion.norm.weight.requires_grad_(False)  # frozen parameters are left out
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    where = {id(p): g for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(where) == len(trainable) == sum(len(g["params"]) for g in groups)  # each exactly once
    named = dict(model.named_parameters())

    def group(name: str) -> dict:
        return where[id(named[name])]

    no_decay = [
        "backbone.tokenizers.s2.norm.weight", "backbone.tokenizers.s2.proj.bias", "backbone.prompts.0",
        "fusion.cls_token", "fusion.modality_embed", "fusion.doy_embed.weight", "backbone.stages.2.0.mlp.b1",
        "backbone.stages.0.0.attn.logit_scale", "backbone.stages.0.0.attn.cpb_mlp.0.weight",
        "backbone.stages.3.0.norm1.weight",
    ]  # fmt: skip
    decay = ["backbone.tokenizers.s2.proj.weight", "backbone.stages.0.0.attn.qkv.weight", "backbone.stages.2.0.mlp.w1",
             "backbone.stages.2.0.mlp.gate.weight", "fusion.blocks.0.mlp.fc1.weight"]  # fmt: skip
    for n in no_decay:
        assert group(n)["weight_decay"] == 0.0 and group(n)["wd_scale"] == 0.0, n
    for n in decay:
        assert group(n)["weight_decay"] == 0.05 and group(n)["wd_scale"] == 1.0, n
    # Layer-wise decay: deeper layers get larger learning rates; the top keeps the base lr.
    order = ["backbone.tokenizers.s2.proj.weight", "backbone.stages.0.0.attn.qkv.weight",
             "backbone.stages.3.0.attn.qkv.weight", "fusion.blocks.0.attn.qkv.weight", "fusion.norm.bias"]  # fmt: skip
    scales = [group(n)["lr_scale"] for n in order]
    assert scales == sorted(scales) and len(set(scales)) == len(scales)
    assert scales[-1] == 1.0 and scales[0] == 0.5**7
    assert group("backbone.stages.0.0.attn.qkv.weight")["lr"] == pytest.approx(1e-3 * 0.5**6)
    opt = torch.optim.AdamW(groups)  # the groups are valid optimizer input as they are
    assert len(opt.param_groups) == len(groups)
