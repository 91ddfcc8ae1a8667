"""Everything the inference stage needs to know about one job, as one frozen value.

The driver builds it once (:meth:`InferenceParams.from_job`), and the runner, the tile-store planner, the actors and
the tile processor all receive this one object instead of re-listing its fields.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import TYPE_CHECKING

from pipeline import storage
from pipeline.kinds import OutputKind, get_kind

if TYPE_CHECKING:
    from pipeline.spec import JobSpec

Period = tuple[str, str]


def iso(value: datetime | date | str) -> str:
    """A period bound as ISO text (bare dates stay dates: they cover the whole day)."""
    return value.isoformat() if isinstance(value, (date, datetime)) else str(value)


@dataclass(frozen=True)
class InferenceParams:
    """One job's inference settings.

    Attributes:
        cube_url: the Zarr cube (absolute path or URL once :meth:`resolved`).
        output_url: the job output folder (``tiles.zarr``, ``manifest/``).
        checkpoint: checkpoint path/URL, or a model name for a seeded random init (:mod:`pipeline.infer.task`).
        kind: output kind name (:mod:`pipeline.kinds`).
        modalities: modalities fed to the model.
        periods: one (start, end) range; two (before, after) for change detection; ISO strings.
        tile_size, overlap, margin: tiling in 10 m pixels (see :mod:`pipeline.infer.tiling` and the job spec).
        context_radius: stage-3/4 neighbourhood radius (None: global attention).
        batch_size: tiles per actor call.
        actors: Ray actors, one model each.
        gpus_per_actor: GPU share of an actor (0: CPU).
        cpus_per_actor: CPU share of an actor (None: the cluster's CPUs split over the actors).
        num_classes, class_names: classes of a head the checkpoint does not carry.
        max_attempts: attempts per tile before it is recorded failed.
        max_restarts: Ray restarts of a dead actor before it is replaced.
        batch_timeout: seconds a batch may run before its actor counts as hung (None: no limit).
        start_timeout: seconds to wait for the first actor to start (None: no limit).
    """

    cube_url: str
    output_url: str
    checkpoint: str | None
    modalities: tuple[str, ...]
    periods: tuple[Period, ...]
    kind: str = "embeddings"
    tile_size: int = 256
    overlap: int = 32
    margin: int = 0
    context_radius: int | None = None
    batch_size: int = 8
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    max_attempts: int = 3
    max_restarts: int = 2
    batch_timeout: float | None = None
    start_timeout: float | None = 600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "periods", tuple((iso(a), iso(b)) for a, b in self.periods))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))
        if len(self.periods) != self.output_kind.periods:
            raise ValueError(f"{self.kind} takes {self.output_kind.periods} time period(s), got {len(self.periods)}")
        if not 0 <= 2 * self.margin <= self.overlap:
            raise ValueError(f"margin {self.margin} must be between 0 and half the overlap {self.overlap}")

    @property
    def output_kind(self) -> OutputKind:
        """The kind object."""
        return get_kind(self.kind)

    def resolved(self) -> InferenceParams:
        """Local paths made absolute (Ray workers do not share the driver's working directory)."""
        from pipeline.infer.task import is_model_name

        ckpt = self.checkpoint
        if ckpt and not is_model_name(ckpt):
            ckpt = storage.absolute(ckpt)
        cube, out = storage.absolute(self.cube_url), storage.absolute(self.output_url)
        return replace(self, cube_url=cube, output_url=out, checkpoint=ckpt)

    @classmethod
    def from_job(cls, job: JobSpec, *, max_attempts: int = 3, cpus_per_actor: float | None = None) -> InferenceParams:
        """The inference settings of a validated job spec."""
        return cls(
            cube_url=job.cube.path, output_url=job.output_path, checkpoint=job.checkpoint, kind=job.output.kind,
            modalities=tuple(job.modalities), periods=tuple(job.periods()), tile_size=job.tiles.size,
            overlap=job.tiles.overlap, margin=job.tiles.margin_px, context_radius=job.tiles.context_radius,
            batch_size=job.batch_size, actors=job.actors, gpus_per_actor=job.gpus_per_actor,
            cpus_per_actor=cpus_per_actor, num_classes=job.output.num_classes,
            class_names=None if job.output.class_names is None else tuple(job.output.class_names),
            max_attempts=max_attempts, batch_timeout=job.batch_timeout_s, start_timeout=job.actor_start_timeout_s,
        )  # fmt: skip
