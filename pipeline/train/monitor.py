"""What a run shows while it trains: TensorBoard scalars, a tqdm bar on rank 0, a JSON-lines metric log, a summary.

TensorBoard (``<storage>/tb`` for local storage) gets every loss component, the learning rate, the EMA momentum,
throughput and the mixture-of-experts load: per MoE layer the share of tokens of its busiest expert (1/E is a
perfect balance, 1 is collapse onto one expert) and the normalised routing entropy (1 = uniform).
``<storage>/metrics.jsonl`` gets one line per step (rank 0), which is what tests and the summary read.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import torch
from torch import Tensor


def expert_load_stats(counts: dict[str, Tensor]) -> dict[str, float]:
    """``{moe/<i>/max_share, moe/<i>/entropy}`` per MoE layer from per-expert token counts or shares (E,)."""
    out: dict[str, float] = {}
    for i, c in enumerate(counts.values()):
        c = c.double()
        total = float(c.sum())
        if total <= 0:
            continue
        p = c / total
        ent = float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(len(p)) if len(p) > 1 else 1.0
        out[f"moe/{i}/max_share"] = float(p.max())
        out[f"moe/{i}/entropy"] = ent
    return out


class Monitor:
    """Rank-0 logging sinks; every method is a no-op on other ranks."""

    def __init__(self, storage: str, rank: int, total_steps: int, start_step: int, enabled_bar: bool = True) -> None:
        self.rank, self.storage = rank, storage.rstrip("/")
        self.writer = None
        self.bar = None
        if rank != 0:
            return
        if "://" not in storage:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(f"{self.storage}/tb", purge_step=start_step or None)
        if enabled_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write ``metrics`` of ``step`` to TensorBoard, the JSON-lines log and the progress bar."""
        if self.rank != 0:
            return
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        with fsspec.open(f"{self.storage}/metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", lr=f"{metrics.get('lr', 0):.2e}")

    def close(self) -> None:
        """Flush and close the sinks."""
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


@dataclass
class Summary:
    """End-of-run report."""

    steps: int
    resumed_from: int
    samples: int
    wall_s: float
    train_s: float
    samples_per_s: float
    final_loss: float
    checkpoint: str | None
    model: str | None
    storage: str

    def text(self) -> str:
        """Human-readable summary."""
        return "\n".join([
            f"steps            {self.steps} (resumed from step {self.resumed_from})",
            f"samples          {self.samples}",
            f"throughput       {self.samples_per_s:.2f} samples/s (training steps only)",
            f"wall time        {self.wall_s:.1f} s (training {self.train_s:.1f} s)",
            f"final loss       {self.final_loss:.4f}",
            f"checkpoint       {self.checkpoint}",
            f"teacher model    {self.model}",
            f"storage          {self.storage}",
        ])  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return asdict(self)


def read_metrics(storage: str) -> list[dict[str, Any]]:
    """All lines of ``<storage>/metrics.jsonl`` (a resumed run appends; later lines win per step)."""
    fs, path = fsspec.core.url_to_fs(f"{storage.rstrip('/')}/metrics.jsonl")
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


class Timer:
    """Wall time of the training steps only (excludes start-up, checkpoint writes)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t0: float | None = None

    def __enter__(self) -> Timer:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.total += time.perf_counter() - (self._t0 or 0.0)
