"""The stages of a job, each behind one protocol: where it writes, whether it is up to date, how it runs.

``cube`` (build or resume the Zarr cube) -> ``inference`` (tiles on Ray actors) -> the stages the output kind
declares (:meth:`pipeline.kinds.OutputKind.post_stages`): ``mosaic``, ``cog``, ``classes`` (class map with its colour
table), ``archive`` (embeddings), ``quicklook``, and for class products ``areas`` (km2 per class), ``polygons``
(class polygons as GeoParquet) and ``tile_labels`` (one label per tile, classification); for object boxes
``detections`` (merged across tiles into GeoParquet) and a ``quicklook`` of the boxes. A stage after inference is
up to date when the finished tiles have not changed since it last ran and its outputs exist
(:class:`pipeline.job.record.ResumeRecord`). The writing itself lives in :mod:`pipeline.mosaic`; a stage only says
where, and which lines it adds to the run's summary (:meth:`PostStage.summary`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline import storage
from pipeline.infer.params import InferenceParams
from pipeline.infer.store import fingerprint, tiles_url
from pipeline.job.cluster import RayCluster, dask_on_ray, nodes_of, stage_records
from pipeline.job.record import ResumeRecord
from pipeline.kinds import OutputKind
from pipeline.spec import JobSpec

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """One stage of a run: ``done``, ``up-to-date``, ``partial`` or ``skipped`` (with the reason)."""

    name: str
    status: str
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    detail: str = ""
    problems: list[str] = field(default_factory=list)  # inputs that could not be read (a partial result)
    failed: dict[int, str] = field(default_factory=dict)  # tiles that failed (inference)
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. area_km2, tiles_per_s, worker_cpu_s
    nodes: list[str] = field(default_factory=list)  # cluster nodes that did the stage's work (when known)
    summary: list[str] = field(default_factory=list)  # lines for the run summary (e.g. the area per class)


@dataclass
class JobContext:
    """What every stage of one run may read: the job, its kind, where it writes, and run options."""

    job: JobSpec
    address: str | None = None
    progress: bool = True
    max_attempts: int = 3
    break_lease: bool = False
    dashboard: bool = False
    record: ResumeRecord = field(init=False)
    cluster: RayCluster = field(init=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.record = ResumeRecord(self.output)
        self.cluster = RayCluster(self.address, dashboard=self.dashboard)

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the finished tiles (read once per run, after inference)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.output)
        return self._fingerprint

    @property
    def kind(self) -> OutputKind:
        """The job's output kind."""
        return self.job.output.output_kind

    @property
    def output(self) -> str:
        """The job's output folder."""
        return self.job.output_path

    def path(self, *parts: str) -> str:
        """A path inside the output folder."""
        return storage.join(self.output, *parts)

    @property
    def tiles(self) -> str:
        """The tile store."""
        return tiles_url(self.output)

    @property
    def mosaic(self) -> str:
        """The stitched mosaic."""
        return self.path("mosaic.zarr")


class Stage:
    """Base of the stages: ``outputs`` (where it writes), ``fresh`` (nothing to do), ``run``."""

    name: ClassVar[str]

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    def outputs(self) -> dict[str, str]:
        """What the stage writes (label -> path or URL)."""
        return {}

    def fresh(self) -> bool:
        """Whether the stage's outputs are up to date (then it does not run)."""
        return False

    def run(self) -> StageResult:
        """Do the stage's work (resuming what an earlier run left) and say what happened."""
        raise NotImplementedError

    def up_to_date(self) -> StageResult:
        """The result of a run that found the stage up to date."""
        entry = self.ctx.record.get(self.name)
        return StageResult(self.name, "up-to-date", 0.0, entry.get("outputs") or self.outputs())

    def record_entry(self, result: StageResult) -> dict[str, Any]:
        """The resume-record entry of a finished run of this stage."""
        return {"status": result.status, "outputs": result.outputs, "seconds": round(result.seconds, 3)}


class CubeStage(Stage):
    """Build (or resume) the job's Zarr cube; a finished cube is not touched. Reports unreadable inputs."""

    name = "cube"

    def outputs(self) -> dict[str, str]:  # noqa: D102
        return {"cube": self.ctx.job.cube.path}

    def fresh(self) -> bool:  # noqa: D102
        from pipeline.cube.layout import cube_state

        return cube_state(self.ctx.job.cube.path, list(self.ctx.job.modalities)) == "complete"

    def problems(self) -> list[str]:
        """Unreadable inputs of the finished cube (raises when they are beyond the job's limits)."""
        from pipeline.cube.health import check_health, cube_health
        from pipeline.cube.layout import root_attrs

        url = self.ctx.job.cube.path
        if "fingerprints" not in (root_attrs(url) or {}):
            return []  # not built by the cube stage: no record of what it read
        health = cube_health(url, list(self.ctx.job.modalities))
        return check_health(url, health, self.ctx.job.cube.max_failed_fraction)

    def up_to_date(self) -> StageResult:
        """The result of a run that found the cube finished."""
        return StageResult(self.name, "up-to-date", 0.0, self.outputs(), problems=self.problems())

    def run(self) -> StageResult:  # noqa: D102
        from pipeline.cube.job import build_from_job

        start = time.perf_counter()
        # Every row of chunks is a Ray task on the job's cluster (a local Ray on one machine); an in-memory cube
        # cannot be shared with other processes, so it is filled by threads here.
        distributed = not self.ctx.job.cube.path.startswith("memory://")
        if distributed:
            self.ctx.cluster.connect()
        report = build_from_job(self.ctx.job, progress=self.ctx.progress, executor="ray" if distributed else "threads")
        problems = self.problems()
        detail = f"{len(problems)} input problem(s), see below" if problems else ""
        nodes = sorted({n for c in report.chunks.values() for n in c.get("nodes", [])})
        return StageResult(self.name, "done", time.perf_counter() - start, {"cube": report.url}, detail, problems,
                           metrics={"worker_cpu_s": report.cpu_s, "worker_peak_rss": report.worker_peak_rss},
                           nodes=nodes)  # fmt: skip


class InferenceStage(Stage):
    """Run (or resume) the model over the job's tiles on Ray actors."""

    name = "inference"

    def outputs(self) -> dict[str, str]:  # noqa: D102
        return {"tiles": self.ctx.tiles}

    def run(self) -> StageResult:  # noqa: D102
        from pipeline.infer.runner import run_inference

        params = InferenceParams.from_job(self.ctx.job, max_attempts=self.ctx.max_attempts)
        self.ctx.cluster.connect()
        r = run_inference(params, address=self.ctx.address, progress=self.ctx.progress)
        self.ctx._fingerprint = None  # the finished tiles may have changed
        detail = (
            f"{r.total} tiles: {r.done} done, {r.skipped} skipped (all nodata), {len(r.failed)} failed, "
            f"{r.pending} pending; {r.computed} computed now ({r.tiles_per_s:.2f} tiles/s), {r.resumed} from earlier "
            "runs"
        )
        status = "done" if r.computed else "up-to-date"
        metrics = {"area_km2": r.area_km2, "tiles_per_s": r.tiles_per_s, **r.worker_totals()}
        result = StageResult(self.name, status, r.seconds, {"tiles": r.tiles_url}, detail, failed=dict(r.failed),
                             metrics=metrics, nodes=list(r.nodes))  # fmt: skip
        if r.total and r.skipped == r.total:
            from pipeline.errors import InputsUnreadableError

            raise InputsUnreadableError(
                f"every one of the {r.total} tiles has no valid input pixel (all nodata or masked) for the job's "
                f"time range and modalities {list(self.ctx.job.modalities)}; check the dates (cloud cover?) and the "
                "region, or run `skypipe cube info` on the cube"
            )
        return result


class PostStage(Stage):
    """A stage after inference: up to date while the finished tiles have not changed and its outputs exist."""

    def fresh(self) -> bool:  # noqa: D102
        return self.ctx.record.fresh(self.name, self.ctx.fingerprint)

    def record_entry(self, result: StageResult) -> dict[str, Any]:  # noqa: D102
        return {**super().record_entry(result), "fingerprint": self.ctx.fingerprint}

    def run(self) -> StageResult:  # noqa: D102
        start = time.perf_counter()
        records = stage_records(self.ctx.output, self.name)
        with dask_on_ray(self.ctx.cluster, records):  # on a cluster, this stage's Dask graphs run on its workers
            outputs = self.write()
        return StageResult(self.name, "done", time.perf_counter() - start, outputs, summary=self.summary(),
                           nodes=nodes_of(records))  # fmt: skip

    def up_to_date(self) -> StageResult:  # noqa: D102
        result = super().up_to_date()
        result.summary = self.summary()
        return result

    def write(self) -> dict[str, str]:
        """Write the stage's outputs; returns them."""
        raise NotImplementedError

    def summary(self) -> list[str]:
        """Lines for the run summary, read from the stage's finished outputs (so an up-to-date run shows them too)."""
        return []


class MosaicStage(PostStage):
    """Blend the done tiles into a seamless Zarr mosaic with Dask."""

    name = "mosaic"

    def outputs(self) -> dict[str, str]:  # noqa: D102
        return {"mosaic": self.ctx.mosaic}

    def write(self) -> dict[str, str]:  # noqa: D102
        from pipeline.mosaic.stitch import stitch_tiles

        return {"mosaic": stitch_tiles(self.ctx.tiles, self.ctx.mosaic)}


class CogStage(PostStage):
    """The mosaic's channels as a Cloud-Optimised GeoTIFF named after the kind (bands ``p(<class>)`` for classes)."""

    name = "cog"

    def outputs(self) -> dict[str, str]:  # noqa: D102
        return {"cog": self.ctx.path(f"{self.ctx.kind.name}.tif")}

    def write(self) -> dict[str, str]:  # noqa: D102
        from pipeline.mosaic.scores import write_score_cog

        return {"cog": write_score_cog(self.ctx.mosaic, self.outputs()["cog"])}


class ClassMapStage(PostStage):
    """The class map of a class-score mosaic as a COG with class names and a colour table."""

    name = "classes"

    def outputs(self) -> dict[str, str]:  # noqa: D102
        return {"classes_cog": self.ctx.path("classes.tif")}

    def write(self) -> dict[str, str]:  # noqa: D102
        from pipeline.mosaic.cog import write_cog

        return {"classes_cog": write_cog(self.ctx.mosaic, self.outputs()["classes_cog"], variable="classes")}


class ArchiveStage(PostStage):
    """An int8 embedding archive (mosaic + per-tile vectors) users can query."""

    name = "archive"

    def outputs(self) -> dict[str, str]:  # noqa: D102
        return {"archive": self.ctx.path("archive")}

    def write(self) -> dict[str, str]:  # noqa: D102
        from pipeline.mosaic.archive import build_archive

        archive = build_archive(
            self.ctx.mosaic, self.ctx.tiles, self.outputs()["archive"], break_lease=self.ctx.break_lease
        )
        return {"archive": archive}


class QuicklookStage(PostStage):
    """A PNG picture of the mosaic (PCA colours, or the class palette with a legend)."""

    name = "quicklook"

    def outputs(self) -> dict[str, str]:  # noqa: D102
        return {"quicklook": self.ctx.path("quicklook.png")}

    def write(self) -> dict[str, str]:  # noqa: D102
        from pipeline.mosaic.quicklook import quicklook

        return {"quicklook": quicklook(self.ctx.mosaic, self.outputs()["quicklook"])}


class AreasStage(PostStage):
    """Area per class of the class map (km2, pixels, share of the mapped area) as CSV and JSON, and in the summary."""

    name = "areas"

    def outputs(self) -> dict[str, str]:  # noqa: D102
        from pipeline.mosaic.areas import AREAS_CSV, AREAS_JSON

        return {"areas_csv": self.ctx.path(AREAS_CSV), "areas_json": self.ctx.path(AREAS_JSON)}

    def write(self) -> dict[str, str]:  # noqa: D102
        from pipeline.mosaic.areas import write_areas

        out = self.outputs()
        write_areas(self.ctx.mosaic, out["areas_csv"], out["areas_json"], job=str(self.ctx.job.name))
        return out

    def summary(self) -> list[str]:  # noqa: D102
        from pipeline.mosaic.areas import read_areas

        return read_areas(self.outputs()["areas_json"]).lines()


class PolygonsStage(PostStage):
    """The class map as polygons (one per connected region of a class) in a GeoParquet table."""

    name = "polygons"
    min_area_m2: ClassVar[float] = 0.0
    """Polygons smaller than this are dropped (0: keep all)."""

    def outputs(self) -> dict[str, str]:  # noqa: D102
        from pipeline.mosaic.vectors import POLYGONS

        return {"polygons": self.ctx.path(POLYGONS)}

    def write(self) -> dict[str, str]:  # noqa: D102
        from pipeline.mosaic.vectors import write_polygons

        url, _ = write_polygons(
            self.ctx.mosaic, self.outputs()["polygons"], min_area_m2=self.min_area_m2, job=str(self.ctx.job.name)
        )
        return {"polygons": url}

    def summary(self) -> list[str]:  # noqa: D102
        from pipeline.mosaic.tables import count_rows

        return [f"{count_rows(self.outputs()['polygons']):,} class polygons"]


class TileLabelsStage(PostStage):
    """One label per done tile (its most probable class, every class's probability, its footprint) as GeoParquet."""

    name = "tile_labels"

    def outputs(self) -> dict[str, str]:  # noqa: D102
        from pipeline.mosaic.tables import TILE_LABELS

        return {"tile_labels": self.ctx.path(TILE_LABELS)}

    def write(self) -> dict[str, str]:  # noqa: D102
        from pipeline.mosaic.tables import write_tile_labels

        url, _ = write_tile_labels(self.ctx.tiles, self.outputs()["tile_labels"], job=str(self.ctx.job.name))
        return {"tile_labels": url}

    def summary(self) -> list[str]:  # noqa: D102
        from pipeline.mosaic.tables import format_label_counts, tile_label_counts

        return format_label_counts(*tile_label_counts(self.outputs()["tile_labels"]))


class DetectionsStage(PostStage):
    """The tiles' object boxes merged across tile borders (a global NMS) into one GeoParquet of oriented polygons."""

    name = "detections"

    def outputs(self) -> dict[str, str]:  # noqa: D102
        from pipeline.mosaic.detections import DETECTIONS

        return {"detections": self.ctx.path(DETECTIONS)}

    def write(self) -> dict[str, str]:  # noqa: D102
        from pipeline.mosaic.detections import write_detections_table

        url, _ = write_detections_table(self.ctx.tiles, self.outputs()["detections"], job=str(self.ctx.job.name))
        return {"detections": url}

    def summary(self) -> list[str]:  # noqa: D102
        from pipeline.infer.store import open_tile_store
        from pipeline.mosaic.detections import format_counts, read_class_counts

        names = open_tile_store(self.ctx.tiles).class_names
        return format_counts(read_class_counts(self.outputs()["detections"], names))


class DetectionQuicklookStage(PostStage):
    """A PNG of the scene (the cube's RGB picture of its finest modality) with the merged boxes drawn per class."""

    name = "quicklook"
    max_size: ClassVar[int] = 1024

    def outputs(self) -> dict[str, str]:  # noqa: D102
        return {"quicklook": self.ctx.path("quicklook.png")}

    def write(self) -> dict[str, str]:  # noqa: D102
        import math

        import geopandas as gpd
        from affine import Affine

        from pipeline.cube.layout import open_modality
        from pipeline.cube.quicklook import quicklook_array
        from pipeline.infer.store import open_tile_store
        from pipeline.mosaic.detections import DETECTIONS, draw_detections
        from pipeline.mosaic.quicklook import save_png, with_legend

        cube, job = self.ctx.job.cube.path, self.ctx.job
        grids = {m: open_modality(cube, m) for m in job.modalities}
        modality = min(grids, key=lambda m: abs(grids[m].rio.transform().a))  # the finest: HR when present
        ds = grids[modality]
        step = max(1, math.ceil(max(ds.sizes["y"], ds.sizes["x"]) / self.max_size))
        rgb = quicklook_array(cube, modality, self.max_size)
        store = open_tile_store(self.ctx.tiles)
        names, colors = store.class_names or [], store.class_colors
        table = gpd.read_parquet(self.ctx.path(DETECTIONS)).to_crs(ds.rio.crs)
        rgba = draw_detections(rgb, ds.rio.transform() * Affine.scale(step), table, names, colors)
        return {"quicklook": save_png(with_legend(rgba, names, colors), self.outputs()["quicklook"])}


def job_stages(ctx: JobContext) -> list[Stage]:
    """Every stage of the job, in order."""
    return [CubeStage(ctx), InferenceStage(ctx), *(cls(ctx) for cls in ctx.kind.post_stages())]
