"""The frozen-feature protocol every checkpoint is scored with (``skypipe eval protocol``), fixed before tuning.

Fixed in issue 15 before any recipe was compared; a change needs a new :data:`PROTOCOL_VERSION` and every
checkpoint re-scored, so numbers of different versions are never put side by side.

**Splits.** RSSCN7 (the shared sample: 60 images per class) is split per class by file-name rank into three
contiguous blocks (:func:`split_rsscn7`, written as folders of symlinks):

* ``pool`` (ranks 1-30): the only RSSCN7 images a pre-training recipe may use, and the probes' training set;
* ``val`` (ranks 31-45): every choice (recipe, step, setting) is made on it;
* ``test`` (ranks 46-60): reported, never used for a choice.

[ours] Contiguous blocks rather than interleaved ranks: neighbouring file numbers of RSSCN7 can be crops of one
scene, so interleaving would put near-duplicates on both sides of a split. BigEarthNet v1 (configilm mock splits,
10 patches each): ``val`` fits on ``train`` and scores ``val``; ``test`` fits on ``train`` + ``val`` and scores
``test``. A pre-training recipe may use the train and val patches, never the test ones.

**Views.** An image is the whole (square) image resized to 128 px and declared at 0.625 m: 8 x 8 cells of the
10 m grid, zoom 1. The scale-shifted test shows the same images at zooms 0.5, 0.75, 1.5 and 2 with the same
declared GSD, as a user who does not know the zoom would give them (:func:`zoom_image`): zoom ``z >= 1`` is the
centre crop of ``1/z`` of the side resized to 128 px; ``z < 1`` is the whole image resized to ``128 z`` px (64 /
96 px: the content is ``z`` times as big, on fewer cells). Probes always train on zoom-1 pool images.

**Metrics.** Feature: the fused embedding mean-pooled over valid cells (``features.pool(..., "fused")``). kNN:
k = 20, cosine, DINO weighting T = 0.07. Linear: logistic regression, ``C`` by 5-fold CV on the pool (folds
shuffled by the seed), fitted once and scored at every zoom. ``shifted``: accuracy over the four shifted zooms
together (equal counts: the mean of the per-zoom accuracies). BigEarthNet S1+S2: one-vs-rest logistic regression
(C = 1) on the fused feature of the 32 px centre crop, macro mAP over the classes with train and eval positives.

**Seeds.** A random initialisation is scored at weight seeds 0-4 (the probe seed follows the weight seed); a
checkpoint at probe seeds 0-4 (its kNN and BigEarthNet numbers do not depend on the seed). Every metric is the
mean and range over the five runs (:func:`aggregate`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.modalities import GRID_GSD, ModalitySpec, get_modality
from pipeline.ssl.regions import DEFAULT_NUM_REGIONS, unknown_region
from pipeline.train.sources import (
    BigEarthNetSource,
    Sample,
    crop_resize,
    list_images,
    modality_entry,
    read_bands,
    region_tensor,
)

from .features import extract, load_model
from .knn import knn_accuracy
from .linear import fit_linear_probe, multilabel_probe

PROTOCOL_VERSION = 1
SPLIT_COUNTS: dict[str, int] = {"pool": 30, "val": 15, "test": 15}
"""Images per class of each RSSCN7 part, in file-name order."""
EVAL_SPLITS = ("val", "test")
SIZE, GSD = 128, 0.625
SHIFTED_ZOOMS: tuple[float, ...] = (0.5, 0.75, 1.5, 2.0)
SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
KNN_K, KNN_T = 20, 0.07
BEN_CROP = 32
FEATURE = "fused"
DEFAULT_SPLIT_DIR = "outputs/rsscn7-split"


def protocol_settings() -> dict[str, Any]:
    """The protocol's fixed settings (stored with every result)."""
    return {
        "version": PROTOCOL_VERSION, "rsscn7_split": SPLIT_COUNTS, "size": SIZE, "gsd": GSD,
        "shifted_zooms": list(SHIFTED_ZOOMS), "seeds": list(SEEDS), "knn": {"k": KNN_K, "temperature": KNN_T},
        "linear": "logistic regression, C by 5-fold CV on pool", "bigearthnet_crop": BEN_CROP, "feature": FEATURE,
    }  # fmt: skip


def split_rsscn7(source: str | Path, out: str | Path, counts: dict[str, int] | None = None) -> dict[str, Path]:
    """Write the RSSCN7 split as ``out/<part>/<class>/<file>`` symlinks (and ``out/split.json``); return the parts.

    Per class, the images sorted by file name are cut into contiguous blocks of ``counts`` (pool, val, test);
    the result depends only on the file names. Re-running leaves an identical split untouched (so a pre-training
    run reading ``pool/`` is never disturbed) and rewrites any other content of the three folders.

    Raises:
        FileNotFoundError: no class sub-folders under ``source``.
        ValueError: a class has fewer images than the blocks need.
    """
    counts = dict(counts or SPLIT_COUNTS)
    source, out = Path(source).resolve(), Path(out)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir()) if source.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"{source}: no class sub-folders (expected the RSSCN7 layout)")
    names: dict[str, dict[str, list[str]]] = {part: {} for part in counts}
    for c in classes:
        files = list_images(source / c)
        if len(files) < sum(counts.values()):
            raise ValueError(f"{source / c}: {len(files)} images, the split needs {sum(counts.values())} ({counts})")
        start = 0
        for part, n in counts.items():
            names[part][c] = [f.name for f in files[start : start + n]]
            start += n
    meta = {"source": str(source), "protocol_version": PROTOCOL_VERSION, "counts": counts, "files": names}
    parts = {part: out / part for part in counts}
    if _split_matches(out, meta):  # leave a split in use (a pre-training run reads pool/) untouched
        return parts
    for part in counts:
        shutil.rmtree(out / part, ignore_errors=True)
        for c, chunk in names[part].items():
            d = out / part / c
            d.mkdir(parents=True, exist_ok=True)
            for name in chunk:
                os.symlink(source / c / name, d / name)
    (out / "split.json").write_text(json.dumps(meta, indent=1))
    return parts


def _split_matches(out: Path, meta: dict[str, Any]) -> bool:
    """Whether ``out`` already holds exactly this split (its record and every link, pointing at its file)."""
    try:
        if json.loads((out / "split.json").read_text()) != meta:
            return False
    except (OSError, ValueError):
        return False
    source = Path(meta["source"])
    for part, per_class in meta["files"].items():
        for c, names in per_class.items():
            d = out / part / c
            if not d.is_dir() or sorted(p.name for p in d.iterdir()) != sorted(names):
                return False
            if any(os.readlink(d / n) != str(source / c / n) for n in names):
                return False
    return True


def zoom_image(x: Tensor, zoom: float, size: int = SIZE, cell: int = 16) -> Tensor:
    """(T, C, H, W) image as seen at ``zoom`` on a ``size`` px input (see the module docstring).

    ``zoom >= 1``: the centre crop of ``1/zoom`` of the shorter side, resized to ``size`` x ``size``. ``zoom < 1``:
    the centre square resized to ``size * zoom`` px, rounded to whole grid cells of ``cell`` px (at least one).
    """
    H, W = x.shape[-2:]
    side = min(H, W)
    crop = max(1, round(side / zoom)) if zoom >= 1 else side
    out = size if zoom >= 1 else max(cell, round(size * zoom / cell) * cell)
    box = ((H - crop) // 2, (W - crop) // 2, crop, crop)
    return crop_resize(x, box, out)


class ZoomedFolder:
    """Labelled images of a class-per-folder tree at one zoom: a source for :func:`~.features.extract`."""

    modalities = ("hr",)

    def __init__(self, root: str | Path, zoom: float = 1.0, size: int = SIZE, gsd: float = GSD,
                 spec: ModalitySpec | None = None) -> None:  # fmt: skip
        self.root = Path(root)
        self.files = list_images(self.root)
        self.classes = sorted({p.relative_to(self.root).parts[0] for p in self.files if p.parent != self.root})
        if not self.files or not self.classes:
            raise FileNotFoundError(f"{self.root}: no class sub-folders with images")
        self.zoom, self.size, self.gsd = zoom, size, gsd
        self.spec = spec or get_modality("hr")
        self.cell = round(GRID_GSD / gsd)

    def __len__(self) -> int:
        return len(self.files)

    def get(self, index: int, rng: np.random.Generator | None = None) -> Sample:
        """Image ``index`` at the folder's zoom (no randomness: ``rng`` is ignored)."""
        path = self.files[index]
        x = torch.from_numpy(read_bands(path, self.spec))[None]  # (1, C, H, W)
        x = zoom_image(x, self.zoom, self.size, self.cell).clamp(0, 255)
        label = self.classes.index(path.relative_to(self.root).parts[0])
        entry = modality_entry(x, self.spec, self.gsd)
        return {"hr": entry, "region": region_tensor(unknown_region(DEFAULT_NUM_REGIONS)), "label": torch.tensor(label)}


Pair = tuple[np.ndarray, np.ndarray]


@dataclass
class Features:
    """Every feature one model contributes to a protocol run."""

    pool: Pair
    zooms: dict[float, Pair]  # the eval split at zoom 1 and the shifted zooms
    ben_fit: Pair
    ben_eval: Pair
    ben_classes: list[str]


def extract_features(model: torch.nn.Module, parts: dict[str, Path], split: str, bigearthnet: str | Path,
                     batch_size: int = 32) -> Features:  # fmt: skip
    """Features of the pool, of the ``split`` images at every zoom and of the BigEarthNet patches."""
    zooms = {z: extract(model, ZoomedFolder(parts[split], z), FEATURE, batch_size) for z in (1.0, *SHIFTED_ZOOMS)}
    pool = extract(model, ZoomedFolder(parts["pool"], 1.0), FEATURE, batch_size)
    fit_parts = ("train",) if split == "val" else ("train", "val")
    fits = [extract(model, BigEarthNetSource(bigearthnet, split=s, size=BEN_CROP), FEATURE, batch_size)
            for s in fit_parts]  # fmt: skip
    ben_eval = BigEarthNetSource(bigearthnet, split=split, size=BEN_CROP)
    ben = extract(model, ben_eval, FEATURE, batch_size)
    fit = (np.concatenate([f[0] for f in fits]), np.concatenate([f[1] for f in fits]))
    return Features(pool, zooms, fit, ben, ben_eval.classes)


def zoom_key(zoom: float) -> str:
    """Metric-name form of a zoom: ``0.5x``, ``1x``, ``1.5x``."""
    return f"{zoom:g}x"


def score(f: Features, seed: int, linear: bool = True) -> dict[str, float]:
    """One run's metrics (fractions in [0, 1]) from the features of one model; ``seed`` drives the linear CV."""
    out: dict[str, float] = {}
    xtr, ytr = f.pool
    knn = {z: knn_accuracy(xtr, ytr, x, y, k=KNN_K, temperature=KNN_T).accuracy for z, (x, y) in f.zooms.items()}
    out |= _zoom_metrics("rsscn7/knn", knn)
    if linear:
        model, _ = fit_linear_probe(xtr, ytr, seed=seed)
        lin = {z: float((model.predict(x) == y).mean()) for z, (x, y) in f.zooms.items()}
        out |= _zoom_metrics("rsscn7/linear", lin)
    out["bigearthnet/map"] = multilabel_probe(*f.ben_fit, *f.ben_eval, classes=f.ben_classes).mAP
    return out


def _zoom_metrics(prefix: str, acc: dict[float, float]) -> dict[str, float]:
    out = {f"{prefix}/plain": acc[1.0], f"{prefix}/shifted": float(np.mean([acc[z] for z in SHIFTED_ZOOMS]))}
    return out | {f"{prefix}/{zoom_key(z)}": a for z, a in acc.items() if z != 1.0}


def aggregate(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """``{metric: {"mean", "min", "max", "values"}}`` over the runs (a metric missing from a run is an error)."""
    if not runs:
        raise ValueError("no runs to aggregate")
    keys = list(runs[0])
    if any(set(r) != set(keys) for r in runs):
        raise ValueError(f"runs report different metrics: {[sorted(r) for r in runs]}")
    out = {}
    for k in keys:
        v = np.array([r[k] for r in runs], dtype=np.float64)
        out[k] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "values": v.tolist()}
    return out


def pool_check(provenance: dict[str, Any] | None, rsscn7: Path, parts: dict[str, Path],
               bigearthnet: Path) -> dict[str, str]:  # fmt: skip
    """Whether a checkpoint's recorded pre-training data can contain the held-out RSSCN7 / BigEarthNet images.

    Per dataset: ``clean`` (no recorded source covers the held-out images), ``leak`` (one does) or ``unknown``
    (no data recorded). The data is read from ``provenance["data_spec"]`` (the source dicts, with BigEarthNet's
    ``split``) when present, else from ``provenance["data"]`` (``kind:path`` strings; a BigEarthNet entry there
    has no split, so it counts as covering the test patches).
    """
    prov = provenance or {}
    entries = prov.get("data_spec") or [
        {"kind": str(e).split(":", 1)[0], "path": str(e).split(":", 1)[-1]} for e in prov.get("data") or []
    ]
    if not entries:
        return {"rsscn7": "unknown", "bigearthnet": "unknown"}
    held_out = [rsscn7.resolve(), *(parts[s].resolve() for s in EVAL_SPLITS)]
    out = {"rsscn7": "clean", "bigearthnet": "clean"}
    for e in entries:
        path = Path(e["path"]).resolve()
        if any(h == path or path in h.parents for h in held_out):
            out["rsscn7"] = "leak"
        covers_ben = path == bigearthnet.resolve() or path in bigearthnet.resolve().parents
        if covers_ben and e.get("split") not in ("train", "val"):
            out["bigearthnet"] = "leak"
    return out


def run_protocol(split: str = "test", checkpoint: str | None = None, random_init: str | None = None,
                 overrides: dict[str, Any] | None = None, seeds: Sequence[int] = SEEDS, linear: bool = True,
                 data_root: str | Path | None = None, split_dir: str | Path = DEFAULT_SPLIT_DIR,
                 batch_size: int = 32, log: Callable[[str], None] | None = print) -> dict[str, Any]:  # fmt: skip
    """Score one checkpoint (probe seeds ``seeds``) or one random configuration (weight seeds ``seeds``).

    Returns:
        The JSON-ready result: settings, model, split, per-run metrics and their :func:`aggregate`.
    """
    from pipeline.catalog.recipe import shared_data_dir

    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
    root = Path(data_root) if data_root else shared_data_dir()
    parts = split_rsscn7(root / "rsscn7", split_dir)
    say = log or (lambda _: None)
    t0 = time.perf_counter()
    runs: list[dict[str, float]] = []
    model_info: dict[str, Any]
    if checkpoint is not None:
        from pipeline.model.checkpoint import checkpoint_sha256, read_checkpoint

        model = load_model(checkpoint=checkpoint)
        prov = read_checkpoint(checkpoint).get("provenance", {})
        check = pool_check(prov, root / "rsscn7", parts, root / "bigearthnet_v1")
        model_info = {"checkpoint": str(checkpoint), "sha256": checkpoint_sha256(checkpoint), "provenance": prov,
                      "pool_check": check, "config": model.config.name}  # fmt: skip
        with torch.inference_mode():
            feats = extract_features(model, parts, split, root / "bigearthnet_v1", batch_size)
        for s in seeds:
            runs.append(score(feats, s, linear))
    elif random_init is not None:
        model_info = {"random_init": random_init, "overrides": overrides or {},
                      "pool_check": {"rsscn7": "clean", "bigearthnet": "clean"}}  # fmt: skip
        for s in seeds:
            model = load_model(random_init=random_init, seed=s, overrides=overrides)
            with torch.inference_mode():
                feats = extract_features(model, parts, split, root / "bigearthnet_v1", batch_size)
            runs.append(score(feats, s, linear))
            r = runs[-1]
            say(f"  seed {s}: kNN plain {r['rsscn7/knn/plain']:.4f} shifted {r['rsscn7/knn/shifted']:.4f}")
    else:
        raise ValueError("give a checkpoint or a random-init model name")
    return {
        "protocol": protocol_settings(), "split": split, "model": model_info, "seeds": list(seeds),
        "n": {"pool": len(feats.pool[1]), "eval": len(feats.zooms[1.0][1]), "ben_fit": len(feats.ben_fit[1]),
              "ben_eval": len(feats.ben_eval[1])},
        "seconds": round(time.perf_counter() - t0, 1), "runs": runs, "metrics": aggregate(runs),
    }  # fmt: skip


_ROWS = (
    ("rsscn7/knn/plain", "RSSCN7 kNN, zoom 1"),
    ("rsscn7/knn/shifted", "RSSCN7 kNN, shifted (0.5-2x)"),
    *((f"rsscn7/knn/{zoom_key(z)}", f"  kNN zoom {zoom_key(z)}") for z in SHIFTED_ZOOMS),
    ("rsscn7/linear/plain", "RSSCN7 linear, zoom 1"),
    ("rsscn7/linear/shifted", "RSSCN7 linear, shifted (0.5-2x)"),
    *((f"rsscn7/linear/{zoom_key(z)}", f"  linear zoom {zoom_key(z)}") for z in SHIFTED_ZOOMS),
    ("bigearthnet/map", "BigEarthNet S1+S2 mAP (linear)"),
)


def _cell(m: dict[str, Any]) -> str:
    return f"{100 * m['mean']:6.2f} ({100 * m['min']:5.1f}-{100 * m['max']:5.1f})"


def format_table(result: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    """The result as a text table (percent: mean (min-max) over the seeds), with a baseline and the difference."""
    if baseline is not None and (
        baseline["split"] != result["split"] or baseline["protocol"]["version"] != result["protocol"]["version"]
    ):
        raise ValueError("the baseline was scored on another split or protocol version")
    m, b = result["metrics"], (baseline or {}).get("metrics", {})
    head = f"{'metric (' + result['split'] + ')':34s} {'mean (range), %':>20s}"
    if b:
        head += f" {'baseline mean (range)':>22s} {'diff':>7s}"
    lines = [head]
    for key, label in _ROWS:
        if key not in m:
            continue
        line = f"{label:34s} {_cell(m[key]):>20s}"
        if key in b:
            line += f" {_cell(b[key]):>22s} {100 * (m[key]['mean'] - b[key]['mean']):+7.2f}"
        lines.append(line)
    return "\n".join(lines)


def describe_model(result: dict[str, Any]) -> str:
    """One line naming what was scored, the runs and the pool check."""
    info = result["model"]
    what = info.get("checkpoint") or f"random init {info.get('random_init')} {json.dumps(info.get('overrides', {}))}"
    seeds = ",".join(str(s) for s in result["seeds"])
    kind = "probe seeds" if "checkpoint" in info else "weight seeds"
    check = ", ".join(f"{k} {v}" for k, v in info["pool_check"].items())
    return f"{what}; {kind} {seeds}; pre-training data vs held-out images: {check}"


__all__: Sequence[str] = [
    "PROTOCOL_VERSION", "SHIFTED_ZOOMS", "SPLIT_COUNTS", "ZoomedFolder", "aggregate", "format_table",
    "pool_check", "run_protocol", "score", "split_rsscn7", "zoom_image",
]  # fmt: skip
