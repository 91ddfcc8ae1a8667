"""A build manifest that survives SIGKILL at any point: one small JSON file per finished chunk.

The manifest lives beside the cube (``<cube>.manifest/``), not inside it, so Zarr tools that list the cube's
hierarchy see only Zarr nodes. Layout::

    <cube>.manifest/plan.json              written once the Zarr template is complete (fingerprints per modality)
    <cube>.manifest/<modality>/<t>_<y>_<x>.<status>.json   one per chunk, after the chunk's data and mask

A chunk counts as done only when its JSON exists, and every JSON is written atomically (temporary file + rename on
local disks, a single PUT on object stores), so a killed build leaves at worst a chunk that is rewritten on resume.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec

from pipeline import storage

ChunkIndex = tuple[int, int, int]  # (time, y block, x block)


def sidecar_url(cube_url: str, suffix: str) -> str:
    """``<cube>.<suffix>`` for a local path or fsspec URL (trailing slashes ignored)."""
    return cube_url.rstrip("/") + "." + suffix


class ChunkManifest:
    """Completed-chunk records of one cube build (see the module docstring for the layout)."""

    def __init__(self, cube_url: str) -> None:
        self.url = sidecar_url(cube_url, "manifest")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _write_atomic(self, path: str, payload: dict[str, Any]) -> None:
        # No fsync: a killed process loses nothing the kernel already has, and after a power cut the chunk data
        # (not fsynced by Zarr either) could be gone anyway. The rename makes the record all-or-nothing.
        storage.write_json(self.fs.unstrip_protocol(path), payload, fsync=False)

    def exists(self) -> bool:
        """Whether the cube stage has written a manifest for this cube."""
        return bool(self.fs.exists(self.root))

    def plan(self) -> dict[str, Any] | None:
        """The stored plan (``None`` if no template was completed yet)."""
        return storage.read_json(self.fs.unstrip_protocol(self._path("plan.json")), default=None)

    def reset(self, plan: dict[str, Any]) -> None:
        """Forget all chunk records and store a new ``plan`` (call after the template is written)."""
        self.clear()
        self._write_atomic(self._path("plan.json"), plan)

    def clear(self) -> None:
        """Remove the manifest (before rewriting a template)."""
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def statuses(self, modality: str) -> dict[ChunkIndex, str]:
        """Status (``ok``, ``empty`` or ``failed``) of every finished chunk of ``modality``, from file names only."""
        folder = self._path(modality)
        if not self.fs.exists(folder):
            return {}
        out = {}
        for path in self.fs.find(folder):
            name = path.rsplit("/", 1)[-1]
            if not name.endswith(".json") or storage.is_temporary(name):
                continue  # a temporary file left by a killed build: that chunk is redone
            stem, status = name[: -len(".json")].rsplit(".", 1)
            t, y, x = (int(v) for v in stem.split("_"))
            out[(t, y, x)] = status
        return out

    def failures(self, modality: str) -> list[dict[str, Any]]:
        """Records of the chunks that failed (sorted by chunk index)."""
        out = []
        for (t, y, x), status in sorted(self.statuses(modality).items()):
            if status == "failed":
                out.append(json.loads(self.fs.cat_file(self._path(modality, f"{t}_{y}_{x}.failed.json"))))
        return out

    def mark(self, modality: str, index: ChunkIndex, status: str, record: dict[str, Any]) -> None:
        """Record chunk ``index`` of ``modality`` as finished (its data must already be written)."""
        t, y, x = index
        path = self._path(modality, f"{t}_{y}_{x}.{status}.json")
        self._write_atomic(path, {"index": list(index), "status": status, **record})
