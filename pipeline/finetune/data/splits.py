"""Train / val / test splits: explicit (folders, key lists, globs), seeded (stratified), or spatially blocked.

A seeded split is a pure function of the seed and the sample keys: train, val and test are opened separately (by
separate processes, at separate times) and must still be disjoint and cover the data, so nothing here depends on
call order. Stratified splits draw per class from a generator seeded by ``(seed, crc32(class))``: adding images to
one class does not reshuffle the others.

A spatially blocked split (:class:`BlockSplit`) cuts each scene into ``block`` x ``block`` px blocks and assigns
blocks to splits; a pixel is labelled in a split only if its block belongs to it and no block of another split lies
within ``gap`` px, so train and test labels never touch. Inputs are not masked: a training window may show imagery
of a test block (unlabelled), as a map would.
"""

from __future__ import annotations

import fnmatch
import math
import zlib
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import maximum_filter

from pipeline.errors import UserError

from .spec import SplitSpec

SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


class SplitError(UserError):
    """An explicit split that cannot be resolved; the message names the split field and what did not match."""


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Items per split for ``n`` items (largest remainder); every positive share gets one item when there are enough.

    >>> split_counts(10, (0.8, 0.1, 0.1))
    [8, 1, 1]
    """
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: n - sum(counts)]:
        counts[i] += 1
    positive = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(positive):
        for i in positive:
            if counts[i] == 0:
                counts[max(range(len(counts)), key=lambda j: counts[j])] -= 1
                counts[i] = 1
    return counts


def _rng(seed: int, group: Hashable | None = None) -> np.random.Generator:
    return np.random.default_rng([seed] if group is None else [seed, zlib.crc32(str(group).encode())])


def assign(n: int, fractions: Sequence[float], seed: int, groups: Sequence[Hashable] | None = None) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of each of ``n`` items; stratified by ``groups`` when given."""
    out = np.zeros(n, dtype=np.int8)
    members = {None: np.arange(n)} if groups is None else {}
    if groups is not None:
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)  # type: ignore[union-attr]
    for g, idx in members.items():
        idx = np.asarray(idx)
        perm = idx[_rng(seed, g).permutation(len(idx))]
        start = 0
        for split, c in enumerate(split_counts(len(idx), fractions)):
            out[perm[start : start + c]] = split
            start += c
    return out


def explicit(ref: str | list[str], root: Path, field: str) -> tuple[Path, list[str] | None]:
    """Resolve an explicit split entry: (root of the split's data, key patterns or None = everything under it).

    A string naming a sub-folder of ``root`` is that split's root; a ``.txt`` file lists keys (one per line, ``#``
    comments); anything else is a glob pattern of keys (a list: several).
    """
    if isinstance(ref, list):
        return root, list(ref)
    path = root / ref
    if path.is_dir():
        return path, None
    if ref.endswith(".txt"):
        if not path.is_file():
            raise SplitError(f"{field}: key list {path} not found")
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        return root, [line for line in lines if line]
    return root, [ref]


def select(keys: Sequence[str], patterns: Sequence[str], field: str) -> np.ndarray:
    """Which ``keys`` match any of ``patterns`` (glob); a pattern matching nothing is an error (likely a typo)."""
    hit = np.zeros(len(keys), dtype=bool)
    unmatched = []
    for pat in patterns:
        m = np.array([fnmatch.fnmatchcase(k, pat) for k in keys], dtype=bool)
        if not m.any():
            unmatched.append(pat)
        hit |= m
    if unmatched:
        example = f" (keys look like {keys[0]!r})" if keys else ""
        raise SplitError(f"{field}: {len(unmatched)} entries match no sample: {unmatched[:10]}{example}")
    return hit


class BlockSplit:
    """Blocks of ``block`` px of every scene, assigned to splits by ``seed`` (global over all scenes' blocks).

    Args:
        shapes: (H, W) of each scene on its reference grid.
        block: block side in pixels.
        gap: unlabelled margin in pixels around blocks of other splits.
        fractions: train / val / test shares of the blocks.
        seed: seed of the assignment.

    """

    def __init__(self, shapes: Sequence[tuple[int, int]], block: int, gap: int, fractions: Sequence[float],
                 seed: int) -> None:  # fmt: skip
        self.shapes, self.block, self.gap = list(shapes), block, gap
        dims = [(-(-h // block), -(-w // block)) for h, w in self.shapes]
        codes = assign(sum(a * b for a, b in dims), fractions, seed)
        self.grids: list[np.ndarray] = []
        start = 0
        for a, b in dims:
            self.grids.append(codes[start : start + a * b].reshape(a, b))
            start += a * b

    def mask(self, scene: int, split: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """(h, w) bool: pixels of the box at (``y0``, ``x0``) labelled in ``split`` (False outside the scene)."""
        g, b = self.gap, self.block
        H, W = self.shapes[scene]
        rows, cols = np.arange(y0 - g, y0 + h + g), np.arange(x0 - g, x0 + w + g)
        grid = self.grids[scene]
        code = grid[np.clip(rows // b, 0, grid.shape[0] - 1)][:, np.clip(cols // b, 0, grid.shape[1] - 1)]
        inside = ((rows >= 0) & (rows < H))[:, None] & ((cols >= 0) & (cols < W))[None]
        code = np.where(inside, code, -1)
        other = (code >= 0) & (code != split)
        if g:
            other = maximum_filter(other, size=2 * g + 1, mode="constant", cval=False)
        return ((code == split) & ~other)[g : g + h, g : g + w]

    def has(self, scene: int, split: int) -> bool:
        """Whether any block of ``scene`` belongs to ``split``."""
        return bool((self.grids[scene] == split).any())


def seeded_rule(spec: Any, seed: int) -> SplitSpec | None:
    """The spec's seeded split, its seed filled in (``seed``: the task's, when the spec gives none).

    None when the spec has explicit splits; neither explicit nor seeded: the default seeded split (80 / 10 / 10).
    """
    if any(getattr(spec, s) is not None for s in SPLIT_INDEX):
        return None
    rule = spec.split or SplitSpec()
    return rule if rule.seed is not None else rule.model_copy(update={"seed": seed})


def membership(keys: Sequence[str], split: str, rule: SplitSpec | None, patterns: Sequence[str] | None,
               shapes: Sequence[tuple[int, int]] | None = None,
               groups: Sequence[Hashable] | None = None) -> tuple[np.ndarray, BlockSplit | None]:  # fmt: skip
    """Which samples (by key) are in ``split``, and the block split when the rule is spatially blocked.

    Args:
        keys: sample keys.
        split: ``train``, ``val`` or ``test``.
        rule: a seeded rule, or None for explicit splits.
        patterns: explicit: key patterns of the split (None = every key).
        shapes: scene shapes (a blocked rule needs them).
        groups: a class per key (stratified seeded split).

    """
    if rule is None:
        return (np.ones(len(keys), dtype=bool) if patterns is None else select(keys, patterns, split)), None
    if rule.block is not None:
        if shapes is None:
            raise ValueError("a spatially blocked split needs the scenes' shapes")
        return np.ones(len(keys), dtype=bool), BlockSplit(shapes, rule.block, rule.gap, rule.fractions, rule.seed or 0)
    return assign(len(keys), rule.fractions, rule.seed or 0, groups) == SPLIT_INDEX[split], None


def explicit_split(spec: Any, split: str, root: Path) -> tuple[Path, list[str] | None] | None:
    """Explicit mode: this split's data root and key patterns (see :func:`explicit`); None = split not declared."""
    ref = getattr(spec, split)
    return None if ref is None else explicit(ref, root, split)
