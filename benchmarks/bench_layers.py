"""Layer benchmarks: our SwinV2 window stages vs timm's, our grouped MoE vs the per-expert loop.

    python benchmarks/bench_layers.py [--device cpu|cuda] [--quick] [--compile|--no-compile] [--out results.json]

Forward+backward (training) and forward-only (inference) throughput, median of timed iterations after
warm-up, variants interleaved. The window stages are stage 1 + 2x2 patch merge + stage 2 (timm's
``SwinTransformerV2Stage`` layout); both models get the same weights and their outputs are compared before
timing. On CUDA everything runs under bf16 autocast, on CPU in fp32.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_name

from pipeline.model.layers.moe import MoEFeedForward, moe_loop_reference
from pipeline.model.layers.window_attention import SwinV2Block

WINDOW_CONFIGS = {  # name: (dims, depths, heads, token map size, batch cpu, batch cuda)
    "small": ((96, 192), (2, 2), (3, 6), 64, 8, 64),
    "base": ((128, 256), (2, 2), (4, 8), 64, 4, 48),
    "skysense": ((352, 704), (2, 2), (11, 22), 64, 2, 16),
}
MOE_DIM, MOE_HIDDEN, MOE_EXPERTS = 384, 1536, 8


class MinimalPatchMerging(nn.Module):
    """2x2 merge (timm SwinV2 channel order): (B, H, W, C) -> (B, H/2, W/2, out_dim)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = x.reshape(B, x.shape[1] // 2, 2, x.shape[2] // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.norm(self.reduction(x))


class OurStage(nn.Module):
    """Our blocks laid out like timm's stage (same state-dict keys)."""

    def __init__(self, dim: int, out_dim: int, depth: int, heads: int, window: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = MinimalPatchMerging(dim, out_dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinV2Block(out_dim, heads, window, 0 if i % 2 == 0 else window // 2) for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            x = blk(x)
        return x


def build_window_models(name: str, window: int = 8) -> tuple[nn.Module, nn.Module]:
    from timm.models.swin_transformer_v2 import SwinTransformerV2Stage

    dims, depths, heads, res, *_ = WINDOW_CONFIGS[name]
    timm_model = nn.Sequential(
        SwinTransformerV2Stage(dims[0], dims[0], (res, res), depths[0], heads[0], window, downsample=False),
        SwinTransformerV2Stage(dims[0], dims[1], (res, res), depths[1], heads[1], window, downsample=True),
    )
    ours = nn.Sequential(
        OurStage(dims[0], dims[0], depths[0], heads[0], window, downsample=False),
        OurStage(dims[0], dims[1], depths[1], heads[1], window, downsample=True),
    )
    with torch.no_grad():  # non-trivial weights: random logit scales and q/v biases, not just the init
        for p in timm_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours.load_state_dict(timm_model.state_dict(), strict=True)
    return ours, timm_model


def timed(
    steps: dict[str, Callable[[], object]], device: torch.device, warmup: int, iters: int, cpu_time: bool = False
) -> dict[str, list[float]]:
    """Seconds of each timed call per step. Steps run round-robin so that load from other processes hits all alike.

    ``cpu_time``: measure process CPU time instead of wall time (with one thread: the work itself, unaffected
    by other processes competing for the cores; wall time on a shared 2-core machine is not).
    """
    clock = time.process_time if cpu_time else time.perf_counter

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in steps.values():
        for _ in range(warmup):
            step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            t0 = clock()
            step()
            sync()
            times[name].append(clock() - t0)
    return times


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def fwd_bwd(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device) -> Callable[[], None]:
    def step() -> None:
        with autocast(device):
            out = model(x)
        out.float().square().mean().backward()

    return step


def fwd_only(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device
) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast(device):
            model(x)

    return step


def bench_window(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    names = ["small", "base"] if args.quick else list(WINDOW_CONFIGS)
    for name in names:
        dims, depths, heads, res, batch_cpu, batch_cuda = WINDOW_CONFIGS[name]
        batch = (batch_cuda if device.type == "cuda" else batch_cpu) // (2 if args.quick else 1)
        torch.manual_seed(0)
        ours, ref = (m.to(device) for m in build_window_models(name))
        x = torch.randn(batch, res, res, dims[0], device=device, requires_grad=True)
        with torch.no_grad(), autocast(device):
            diff = (ours(x).float() - ref(x).float()).abs().max().item()
        variants = {"ours eager": ours, "timm eager": ref}
        if args.compile:
            variants |= {"ours compiled": torch.compile(ours), "timm compiled": torch.compile(ref)}
        warmup = args.warmup + (2 if args.compile else 0)
        steps = {k: fwd_bwd(m, x, device) for k, m in variants.items()}
        steps |= {f"{k} inference": fwd_only(m, x, device) for k, m in variants.items()}
        secs = timed(steps, device, warmup, args.iters, args.timer == "cpu")
        results = {k: batch / statistics.median(t) for k, t in secs.items()}
        for label, ips in results.items():
            print(f"  window {name:8s} {label:24s} {ips:9.2f} img/s", flush=True)
        rows.append(
            {
                "config": name,
                "dims": dims,
                "depths": depths,
                "heads": heads,
                "tokens": [res, res],
                "window": 8,
                "batch": batch,
                "max_abs_diff_vs_timm": diff,
                "images_per_s": results,
                "images_per_s_best": {k: batch / min(t) for k, t in secs.items()},
            }
        )
    return rows


def bench_moe(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    token_counts = [1024, 4096] if args.quick else [1024, 4096, 16384]
    if device.type == "cuda":
        token_counts = [t * 8 for t in token_counts]
    for tokens in token_counts:
        torch.manual_seed(0)
        moe = MoEFeedForward(MOE_DIM, MOE_HIDDEN, MOE_EXPERTS).to(device)
        x = torch.randn(tokens, MOE_DIM, device=device, requires_grad=True)
        variants = {"grouped": moe, "loop": lambda t, m=moe: moe_loop_reference(m, t)}
        if args.compile:
            variants["grouped compiled"] = torch.compile(moe)
        steps = {k: fwd_bwd(m, x, device) for k, m in variants.items()}
        secs = timed(steps, device, args.warmup, args.iters, args.timer == "cpu")
        results = {k: tokens / statistics.median(t) for k, t in secs.items()}
        for label, tps in results.items():
            print(f"  moe {tokens:6d} tokens {label:16s} {tps:12.0f} tok/s", flush=True)
        rows.append(
            {
                "tokens": tokens,
                "dim": MOE_DIM,
                "hidden": MOE_HIDDEN,
                "experts": MOE_EXPERTS,
                "top_k": 1,
                "tokens_per_s": results,
                "tokens_per_s_best": {k: tokens / min(t) for k, t in secs.items()},
            }
        )
    return rows


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu_model": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "date": dt.date.today().isoformat(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["capability"] = list(torch.cuda.get_device_capability(device))
    else:
        info["device_name"] = info["cpu_model"]
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def table(window_rows: list[dict], moe_rows: list[dict]) -> str:
    lines = [
        "| window stages | batch | ours eager | timm eager | speed-up | ours compiled | timm compiled | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in window_rows:
        res = r["images_per_s"]
        eager = res["ours eager"] / res["timm eager"]
        comp = [f"{res[k]:.2f}" if k in res else "-" for k in ("ours compiled", "timm compiled")]
        comp_x = f"{res['ours compiled'] / res['timm compiled']:.2f}x" if "ours compiled" in res else "-"
        lines.append(
            f"| {r['config']} {r['dims']} | {r['batch']} | {res['ours eager']:.2f} | {res['timm eager']:.2f} "
            f"| {eager:.2f}x | {comp[0]} | {comp[1]} | {comp_x} |"
        )
    lines += ["", "| inference (forward only) | ours eager | timm eager | speed-up |", "|---|---|---|---|"]
    for r in window_rows:
        res = r["images_per_s"]
        ours, timm_ = res["ours eager inference"], res["timm eager inference"]
        lines.append(f"| {r['config']} {r['dims']} | {ours:.2f} | {timm_:.2f} | {ours / timm_:.2f}x |")
    lines += [
        "",
        "| MoE tokens | grouped tok/s | loop tok/s | speed-up | grouped compiled tok/s |",
        "|---|---|---|---|---|",
    ]
    for r in moe_rows:
        res = r["tokens_per_s"]
        comp = f"{res['grouped compiled']:.0f}" if "grouped compiled" in res else "-"
        lines.append(
            f"| {r['tokens']} | {res['grouped']:.0f} | {res['loop']:.0f} | "
            f"{res['grouped'] / res['loop']:.2f}x | {comp} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer configs, smaller batches, fewer iterations")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile'd models (default: on for cuda, off for cpu)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--timer",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: single-threaded process CPU time, for comparisons on a machine shared with other jobs",
    )
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--only", choices=["window", "moe"], default=None)
    parser.add_argument("--out", type=Path, default=None, help="write results + machine info as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.timer == "cpu":
        if device.type != "cpu":
            parser.error("--timer cpu is for --device cpu")
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    args.iters = args.iters or (3 if args.quick else 7)
    args.warmup = args.warmup or (1 if args.quick else 2)
    info = machine_info(device)
    info["loadavg_start"] = list(os.getloadavg())
    info["timer"] = args.timer
    print(f"# {info['device_name']} | torch {info['torch']} | {torch.get_num_threads()} threads", flush=True)
    window_rows = bench_window(args, device) if args.only in (None, "window") else []
    moe_rows = bench_moe(args, device) if args.only in (None, "moe") else []
    info["loadavg_end"] = list(os.getloadavg())
    print(table(window_rows, moe_rows))
    print(f"load average (1/5/15 min) at start {info['loadavg_start']}, at end {info['loadavg_end']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": info,
            "args": {k: str(v) for k, v in vars(args).items()},
            "window_stages": window_rows,
            "moe": moe_rows,
        }
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
