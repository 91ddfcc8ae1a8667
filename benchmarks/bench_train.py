"""Pre-training throughput on this machine: a full teacher-student step, and the data loader beside it.

    python benchmarks/bench_train.py --out /tmp/bench_train.json

1. Loader vs step, tiny recipe (``jobs/pretrain-tiny.yaml``): samples/s the DataLoader delivers alone (0, 1, 2
   worker processes, RSSCN7 128 px HR tiles, batch 16) next to samples/s of the full SSL step (views, student
   forward+backward, teacher forward, AdamW, EMA) on the same batches.
2. Full step of the BASE configuration (skysense_v2_base, 277 M parameters): a few steps on small inputs (HR
   64 px at 0.625 m, and S2+S1 8 x 8 px with 2 dates), plus the state sizes a run has to hold and checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from machine import cpu_name

from pipeline.catalog.recipe import shared_data_dir
from pipeline.model import ModalityInput, create_model
from pipeline.ssl import MultiViewAugment, SSLMetaArch, param_groups
from pipeline.train.data import (
    MixedDataset,
    StepBatchSampler,
    batch_region,
    make_loader,
    measure_loader,
    to_model_inputs,
)
from pipeline.train.sources import ImageFolderSource

DATA = shared_data_dir()


def build(name: str, overrides: dict, ssl: dict, augment: dict) -> tuple[SSLMetaArch, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = create_model(name, **overrides)
    meta = SSLMetaArch(model, augment=MultiViewAugment(model.config.modalities, **augment), **ssl)
    opt = torch.optim.AdamW(param_groups(meta, lr=1e-4, weight_decay=0.04), lr=1e-4)
    return meta, opt


def step(meta: SSLMetaArch, opt: torch.optim.Optimizer, batch: dict, region: torch.Tensor | None = None) -> float:
    out = meta(batch, region=region)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 3.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    meta.update_teacher(0.996)
    return float(out["loss"].detach())


def timed_steps(meta: SSLMetaArch, opt: torch.optim.Optimizer, batches: list[tuple[dict, torch.Tensor | None]],
                warmup: int = 1) -> dict:  # fmt: skip
    for b, r in batches[:warmup]:
        step(meta, opt, b, r)
    t0 = time.perf_counter()
    n = 0
    for b, r in batches[warmup:]:
        step(meta, opt, b, r)
        n += next(iter(b.values())).x.shape[0]
    dt = time.perf_counter() - t0
    return {"steps": len(batches) - warmup, "samples": n, "seconds": dt, "samples_per_s": n / dt}


def state_sizes(meta: SSLMetaArch, opt: torch.optim.Optimizer) -> dict:
    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    student = list(meta.student_modules.parameters())
    opt_state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "student_params": sum(p.numel() for p in student),
        "backbone_params": sum(p.numel() for p in meta.student.parameters()),
        "student_MB": nbytes(student) / 2**20,
        "teacher_MB": nbytes(meta.teacher_modules.parameters()) / 2**20,
        "grads_MB": nbytes(p.grad for p in student if p.grad is not None) / 2**20,
        "adamw_state_MB": nbytes(opt_state) / 2**20,
    }


def bench_tiny(steps: int) -> dict:
    src = ImageFolderSource(DATA / "rsscn7", size=128, gsd=0.625)
    ds = MixedDataset([src])
    loader_rates = {}
    for workers in (0, 1, 2):
        sampler = StepBatchSampler([len(src)], None, 16, seed=0, stop=12)
        loader_rates[workers] = measure_loader(make_loader(ds, sampler, workers, prefetch_factor=2), 10).samples_per_s
    meta, opt = build("skysense_v2_tiny", {"num_experts": 4},
                      {"proj_dim": 128, "head_hidden_dim": 512, "num_queries": 16, "max_pixels": 256},
                      {"num_global": 2, "num_local": 2})  # fmt: skip
    loader = make_loader(ds, StepBatchSampler([len(src)], None, 16, seed=1, stop=steps + 1), 0)
    batches = [(to_model_inputs(b), batch_region(b)) for b in loader]  # as the loop: regions go with the batch
    return {"loader_samples_per_s": loader_rates, "step": timed_steps(meta, opt, batches)}


def bench_base(steps: int) -> dict:
    meta, opt = build("skysense_v2_base", {}, {}, {"num_global": 2, "num_local": 2})
    g = torch.Generator().manual_seed(0)
    hr = [({"hr": ModalityInput(torch.randn(2, 1, 3, 64, 64, generator=g), gsd=0.625)}, None) for _ in range(steps + 1)]
    ms = [
        (
            {
                "s2": ModalityInput(torch.randn(2, 2, 10, 8, 8, generator=g), doy=torch.tensor([[100, 200]] * 2)),
                "s1": ModalityInput(torch.randn(2, 2, 2, 8, 8, generator=g), doy=torch.tensor([[101, 201]] * 2)),
            },
            None,  # unknown location
        )
        for _ in range(steps + 1)
    ]
    res = {"hr_64px": timed_steps(meta, opt, hr), "s2_s1_8px_2dates": timed_steps(meta, opt, ms)}
    res["state"] = state_sizes(meta, opt)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-base", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
                    "load_avg_1m_start": os.getloadavg()[0], "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "tiny_recipe": bench_tiny(args.steps),
    }  # fmt: skip
    if not args.skip_base:
        res["base"] = bench_base(args.steps)
    res["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
