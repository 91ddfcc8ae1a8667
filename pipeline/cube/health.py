"""How much of a built cube's input could be read, and whether that is enough for a job to go on.

A cube build keeps going when some inputs cannot be read: unusable items are skipped (their pixels are nodata) and
chunks whose reads failed twice are recorded as failed (nodata there). A job built on such a cube must not report
plain success, so :func:`check_health` sorts what happened into

* fatal (raises :class:`pipeline.errors.InputsUnreadableError`): every item of a modality was unusable, or more
  than ``max_failed_fraction`` of a modality's chunks failed;
* a partial result (returned as problem lines for the run summary, exit code 3): anything less.

Everything is read from the group attributes the builder writes when it finishes (``items``, ``skipped_assets``,
``failures``), so a rerun over a finished cube reports the same problems again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import zarr

from pipeline.cube.layout import DATA_VAR
from pipeline.errors import InputsUnreadableError
from pipeline.storage import store_path


@dataclass
class ModalityHealth:
    """What could not be read for one modality of a cube."""

    modality: str
    items_total: int = 0
    unusable_items: list[str] = field(default_factory=list)
    skipped_assets: list[dict[str, Any]] = field(default_factory=list)
    chunks_total: int = 0
    failed_chunks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed_fraction(self) -> float:
        """Share of the modality's chunks whose reads failed."""
        return len(self.failed_chunks) / self.chunks_total if self.chunks_total else 0.0

    @property
    def ok(self) -> bool:
        """Nothing was skipped or failed."""
        return not (self.unusable_items or self.failed_chunks)


def cube_health(url: str, modalities: list[str]) -> dict[str, ModalityHealth]:
    """Per modality: items found and unusable, skipped assets, chunks and failed chunks of a finished build."""
    root = zarr.open_group(store_path(url), mode="r")
    out = {}
    for name in modalities:
        group = root[name]
        attrs = group.attrs.asdict()
        h = ModalityHealth(name)
        for entries in (attrs.get("items") or {}).values():
            h.items_total += len(entries)
            h.unusable_items += [e["id"] for e in entries if not e.get("usable", True)]
        h.skipped_assets = list(attrs.get("skipped_assets") or [])
        h.failed_chunks = list(attrs.get("failures") or [])
        data = group[DATA_VAR]
        h.chunks_total = math.prod(-(-n // c) for n, c in zip(data.shape, data.chunks))
        out[name] = h
    return out


def _asset_line(p: dict[str, Any]) -> str:
    return f"item {p.get('item')!r} asset {p.get('asset')!r}: {p.get('error')} ({p.get('hint')})"


def check_health(url: str, health: dict[str, ModalityHealth], max_failed_fraction: float) -> list[str]:
    """Problem lines of a partial result; raises when a modality's inputs are unreadable beyond the limits.

    Raises:
        InputsUnreadableError: every item of a modality was unusable, or too many of its chunks failed.
    """
    problems: list[str] = []
    for name, h in health.items():
        if h.items_total and len(set(h.unusable_items)) == h.items_total:
            shown = "; ".join(_asset_line(p) for p in h.skipped_assets[:3])
            raise InputsUnreadableError(
                f"{url}: no {name} input could be read ({h.items_total} item(s), all unusable): {shown}. "
                "Fix the catalog or the files, then rerun (the cube is rebuilt from a new plan)"
            )
        if h.failed_fraction > max_failed_fraction:
            items = sorted({i for f in h.failed_chunks for i in f.get("items", [])})
            raise InputsUnreadableError(
                f"{url}: {len(h.failed_chunks)} of {h.chunks_total} {name} chunks ({h.failed_fraction:.0%}) could "
                f"not be read, more than cube.max_failed_fraction = {max_failed_fraction:.0%}; items {items[:5]}: "
                f"{(h.failed_chunks[0].get('error') or '')[:200]}. Fix or re-download those files and rerun"
            )
        problems += [f"[{name}] skipped {_asset_line(p)}" for p in h.skipped_assets]
        if h.failed_chunks:
            items = sorted({i for f in h.failed_chunks for i in f.get("items", [])})
            problems.append(
                f"[{name}] {len(h.failed_chunks)} of {h.chunks_total} chunk(s) could not be read (nodata there): "
                f"items {items}"
            )
    return problems
