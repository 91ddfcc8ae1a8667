"""Training data: sources mixed batch by batch, a replayable data order, and a loader that keeps devices fed.

Data order [ours]: the micro-batch at position ``p`` (a global counter of micro-batches, the same on every rank)
is a pure function of ``(seed, p)``: one source is drawn by weight for the whole global micro-batch (so every
sample of a batch has the same modalities and shapes, and every rank runs the same modules), then
``world_size * batch_size`` sample indices are drawn with replacement and each rank takes its slice, each with
its own augmentation seed. Resuming at position ``p`` therefore replays exactly the batches an uninterrupted run
would have seen, whatever the number of loader workers, without storing any iterator state.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.model.skysense import ModalityInput
from pipeline.ssl.regions import DEFAULT_NUM_REGIONS

from .sources import Sample, Source

Key = tuple[int, int, int]  # (source, sample index, augmentation seed)


class MixedDataset(Dataset[Sample]):
    """Map-style dataset over several sources, addressed by :data:`Key`."""

    def __init__(self, sources: Sequence[Source], augment: bool = True) -> None:
        if not sources:
            raise ValueError("no data sources")
        self.sources = list(sources)
        self.augment = augment

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, key: Key) -> Sample:  # type: ignore[override]
        src, index, seed = key
        rng = np.random.default_rng(seed) if self.augment else None
        return self.sources[src].get(index, rng)


class StepBatchSampler(Sampler[list[Key]]):
    """Deterministic, resumable batches: micro-batch ``p`` depends only on ``(seed, p)`` (see module docstring).

    Args:
        sizes: number of samples of each source.
        weights: relative sampling weight of each source (normalised here).
        batch_size: samples per rank per micro-batch.
        world_size, rank: data-parallel layout.
        seed: data-order seed.
        start: first micro-batch position (resume).
        stop: position to stop before (None = endless).
        repeat: always yield micro-batch 0 (overfitting checks).

    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None, batch_size: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, start: int = 0, stop: int | None = None,
                 repeat: bool = False) -> None:  # fmt: skip
        w = np.asarray(weights if weights is not None else [1.0] * len(sizes), dtype=np.float64)
        if len(w) != len(sizes) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"source weights {list(w)} do not fit {len(sizes)} sources")
        self.sizes, self.p = list(sizes), w / w.sum()
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.start, self.stop, self.repeat = seed, start, stop, repeat

    def batch(self, position: int) -> list[Key]:
        """Keys of this rank's share of micro-batch ``position``."""
        rng = np.random.default_rng([self.seed, 0 if self.repeat else position])
        src = int(rng.choice(len(self.sizes), p=self.p))
        n = self.batch_size * self.world_size
        idx = rng.integers(0, self.sizes[src], size=n)
        seeds = rng.integers(0, 2**62, size=n)
        lo = self.rank * self.batch_size
        return [(src, int(i), int(s)) for i, s in zip(idx[lo : lo + self.batch_size], seeds[lo : lo + self.batch_size])]

    def __iter__(self) -> Iterator[list[Key]]:
        p = self.start
        while self.stop is None or p < self.stop:
            yield self.batch(p)
            p += 1

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("endless sampler has no length")
        return max(0, self.stop - self.start)


def collate(samples: Sequence[Sample]) -> dict[str, Any]:
    """Stack samples of one source.

    Returns:
        ``{modality: {"x": (B, T, C, H, W), "doy", "valid", "gsd": (B,)}, "region": (B,) int64, "label": (B, ...)}``
        (``label`` only from labelled sources).
    """
    keys = set(samples[0])
    if any(set(s) != keys for s in samples):
        raise ValueError(f"a batch mixes samples with different modalities: {[sorted(s) for s in samples]}")
    out: dict[str, Any] = {}
    for k in keys:
        v = samples[0][k]
        if isinstance(v, Mapping):
            out[k] = {f: torch.stack([s[k][f] for s in samples]) for f in v}
        else:
            out[k] = torch.stack([torch.as_tensor(s[k]) for s in samples])
    return out


def to_model_inputs(batch: Mapping[str, Any], device: torch.device | str = "cpu") -> dict[str, ModalityInput]:
    """Collated batch -> ``{modality: ModalityInput}`` on ``device`` (non-blocking copies from pinned memory)."""
    out: dict[str, ModalityInput] = {}
    for name, v in batch.items():
        if not isinstance(v, Mapping):
            continue
        gsd = v["gsd"]
        if not torch.all(gsd == gsd[0]):
            raise ValueError(f"modality {name!r}: samples of one batch have different GSDs {gsd.tolist()}")
        out[name] = ModalityInput(
            x=v["x"].to(device, non_blocking=True),
            doy=v["doy"].to(device, non_blocking=True),
            valid=v["valid"].to(device, non_blocking=True),
            gsd=float(gsd[0]),
        )
    return out


def batch_region(batch: Mapping[str, Any], device: torch.device | str = "cpu") -> Tensor:
    """(B,) int64 GCPL region ids of a collated batch on ``device`` (see :mod:`pipeline.ssl.regions`)."""
    if "region" not in batch:
        raise ValueError(
            "the batch carries no 'region': every training source must give its samples a GCPL region id "
            "(see pipeline.train.sources)"
        )
    return batch["region"].to(device, dtype=torch.long, non_blocking=True)


def make_loader(dataset: MixedDataset, sampler: StepBatchSampler, num_workers: int = 2, pin_memory: bool = False,
                prefetch_factor: int = 4) -> DataLoader:  # fmt: skip
    """A DataLoader over ``sampler``'s batches: ``num_workers`` processes, each ``prefetch_factor`` batches ahead.

    Workers are plain worker processes; the data order does not depend on them (keys carry the randomness).
    """
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False}
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, **kwargs)  # fmt: skip


def build_sources(
    sources: Sequence[Mapping[str, Any]], num_regions: int = DEFAULT_NUM_REGIONS
) -> tuple[list[Source], list[float]]:
    """Sources (and their weights) from plain data-source dicts (``PretrainSpec.data`` entries, ``kind`` keyed).

    Args:
        sources: the data-source dicts.
        num_regions: GCPL regions of the job (the meta-architecture's ``num_regions``).
    """
    from .cubes import CubeSource
    from .scenes import SceneSource
    from .sources import BigEarthNetSource, ChangePairSource, ImageFolderSource

    built: list[Source] = []
    weights: list[float] = []
    for d in sources:
        d = dict(d)
        kind, weight = d.pop("kind"), float(d.pop("weight", 1.0))
        where = {"region": d.get("region"), "num_regions": num_regions}
        if kind == "images":
            built.append(ImageFolderSource(d["path"], size=d["size"], gsd=d["gsd"], scale=tuple(d["scale"]), **where))
        elif kind == "change_pairs":
            built.append(ChangePairSource(d["path"], size=d["size"], gsd=d["gsd"], scale=tuple(d["scale"]), **where))
        elif kind == "bigearthnet":
            built.append(BigEarthNetSource(d["path"], split=d.get("split"), size=d.get("size"), **where))
        elif kind == "scenes":
            built.append(SceneSource(d["path"], format=d["format"], size=d["size"], gsd=d.get("gsd"),
                                     zoom=tuple(d["zoom"]), native_gsd=d.get("native_gsd"), glob=d.get("glob"),
                                     modality=d["modality"], **where))  # fmt: skip
        elif kind == "cube":
            built.append(CubeSource(d["path"], size=d["size"], modalities=d.get("modalities"),
                                    num_dates=d["num_dates"], min_valid=d["min_valid"],
                                    num_regions=num_regions))  # fmt: skip
        else:
            raise ValueError(f"unknown data source kind {kind!r}")
        weights.append(weight)
    return built, weights


@dataclass
class Rate:
    """Throughput of a measured loop."""

    batches: int
    samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        """Throughput."""
        return self.samples / max(self.seconds, 1e-9)


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Samples in a collated batch."""
    for v in batch.values():
        return int(next(iter(v.values())).shape[0]) if isinstance(v, Mapping) else int(v.shape[0])
    return 0


def measure_loader(loader: DataLoader, batches: int, warmup: int = 1) -> Rate:
    """Samples/s the loader delivers on its own (no model), after ``warmup`` batches (worker start-up)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        n += batch_size_of(next(it))
    return Rate(batches, n, time.perf_counter() - t0)


def first_tensor(batch: Mapping[str, Any]) -> Tensor:
    """Any tensor of the batch (device checks in tests)."""
    for v in batch.values():
        return next(iter(v.values())) if isinstance(v, Mapping) else v
    raise ValueError("empty batch")
