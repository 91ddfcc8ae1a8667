"""FSDP2 (``fully_shard``) on CPU with gloo, 2 processes: same losses as DDP, and a sharded resume is exact.

The FSDP2 path is what the huge configuration uses on GPUs; on CPU it runs the same code (gloo collectives).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MICRO = {"dims": (32, 32, 64, 64), "depths": (1, 1, 1, 1), "moe_blocks": 1, "num_experts": 4, "fusion_dim": 64,
         "fusion_heads": 2}  # fmt: skip


def _build(mode: str):
    from pipeline.model import create_model
    from pipeline.ssl import MultiViewAugment, SSLMetaArch, param_groups
    from pipeline.train.parallel import unwrap, wrap_ddp, wrap_fsdp

    torch.manual_seed(0)
    m = create_model("skysense_v2_tiny", **MICRO)
    meta = SSLMetaArch(m, proj_dim=32, head_hidden_dim=64, num_queries=4, max_pixels=64, distributed=True,
                       augment=MultiViewAugment(m.config.modalities, num_local=2))  # fmt: skip
    model = wrap_fsdp(meta) if mode == "fsdp" else wrap_ddp(meta, torch.device("cpu"))
    opt = torch.optim.AdamW(param_groups(unwrap(model), lr=1e-3, weight_decay=0.04), lr=1e-3)
    return model, opt


def _step(model, opt, x: torch.Tensor, step: int, rank: int) -> float:
    from pipeline.model import ModalityInput
    from pipeline.train.parallel import unwrap

    torch.manual_seed(100 + 7 * step + rank)
    out = model({"hr": ModalityInput(x, gsd=0.625)})
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 3.0)
    opt.step()
    opt.zero_grad()
    unwrap(model).update_teacher(0.99)
    loss = out["loss"].detach().clone()
    dist.all_reduce(loss)
    return float(loss) / dist.get_world_size()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from pipeline.train.parallel import unwrap
    from pipeline.train.state import (
        gather_state,
        latest_checkpoint,
        load_training_checkpoint,
        restore,
        save_training_checkpoint,
    )

    storage = str(Path(out).parent / "run")

    x = torch.randn(4, 1, 3, 64, 64, generator=torch.Generator().manual_seed(rank))
    res = {}
    for mode in ("ddp", "fsdp"):
        model, opt = _build(mode)
        res[mode] = [_step(model, opt, x, s, rank) for s in range(3)]
        if mode == "fsdp":
            msd, osd = gather_state(model, opt)  # full state on rank 0 only: save it, every rank reads it
            if rank == 0:
                student = unwrap(model).student
                save_training_checkpoint(storage, 3, student.config, msd, osd, "student_modules.model", {})
            dist.barrier()
            res["sharded"] = type(next(model.parameters())).__name__
            fresh, fopt = _build("fsdp")
            state, optim, _ = load_training_checkpoint(latest_checkpoint(storage))
            restore(fresh, fopt, state, optim)
            res["next"] = _step(model, opt, x, 3, rank)
            res["next_resumed"] = _step(fresh, fopt, x, 3, rank)
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_matches_ddp_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2)
    res = json.loads(out.read_text())
    assert res["sharded"] == "DTensor"
    assert res["fsdp"] == pytest.approx(res["ddp"], rel=1e-5)
    assert res["next_resumed"] == pytest.approx(res["next"], rel=1e-5)
