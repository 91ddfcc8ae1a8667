"""The resume record of a job's stages: ``{output}/stages.json``, one entry per stage that finished.

``{stage name: {"status", "fingerprint", "outputs", "seconds", "finished_at", "detail"}}``. A stage after inference
is up to date when its entry's fingerprint equals the current fingerprint of the finished tiles
(:func:`pipeline.infer.store.fingerprint`) and its outputs exist; the entry is written only after the stage's outputs
are complete, so a run killed in the middle of a stage redoes that stage. The cube and inference stages keep
their own per-chunk / per-tile manifests and are recorded here for ``skypipe status`` only.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pipeline import storage

RECORD = "stages.json"


class ResumeRecord:
    """Read / update the stage entries of one job output folder."""

    def __init__(self, output_url: str) -> None:
        self.url = storage.join(output_url, RECORD)
        self.entries: dict[str, dict[str, Any]] = storage.read_json(self.url, default={})

    def get(self, stage: str) -> dict[str, Any]:
        """The entry of ``stage`` (empty when it never finished)."""
        return dict(self.entries.get(stage) or {})

    def fresh(self, stage: str, fingerprint: str) -> bool:
        """Whether ``stage`` finished for this ``fingerprint`` and its outputs still exist."""
        entry = self.get(stage)
        outputs = entry.get("outputs") or {}
        return entry.get("fingerprint") == fingerprint and all(storage.exists(p) for p in outputs.values())

    def save(self, stage: str, **entry: Any) -> None:
        """Record ``stage`` as finished (atomically; call only once its outputs are complete)."""
        entry["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.entries[stage] = entry
        storage.write_json(self.url, self.entries, indent=2)
