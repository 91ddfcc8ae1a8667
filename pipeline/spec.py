"""The job spec: one YAML file describes a whole job (catalog search -> cube -> inference), validated once here.

Example (``jobs/cube-sen1floods11.yaml``)::

    name: sen1floods11
    region: [-0.7819, 38.0828, -0.7359, 38.1288]   # WGS84 lon/lat bbox, or a GeoJSON file
    time: {start: 2019-09-17, end: 2019-09-18}
    catalog: local                                 # a name in catalogs/ or a path to a catalog YAML
    modalities: [s2, s1]
    cube: {path: outputs/sen1floods11.zarr, chunks: {y: 256, x: 256}}

Relative *input* paths (the region GeoJSON, a catalog YAML path) are resolved against the job file's folder, so a
job folder can be moved as a whole; *output* paths (``cube.path``, ``output.path``) are kept as written (relative to
the working directory) and may be fsspec URLs (``s3://...``, ``memory://...``), opened through fsspec / Zarr.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.cube.grid import normalize_crs
from pipeline.kinds import KINDS, OutputKind, get_kind
from pipeline.modalities import DEFAULT_MODALITIES, get_modality


def _known_modality(name: str) -> str:
    get_modality(name)  # ValueError naming the known ones
    return name


def _known_kind(name: str) -> str:
    get_kind(name)
    return name


Modality = Annotated[str, AfterValidator(_known_modality)]
"""A modality name known to :mod:`pipeline.modalities` (``hr``, ``s2``, ``s1``)."""

DEFAULT_MAX_AREA_KM2 = 100_000.0
"""[ours] Regions larger than this are refused unless the job raises ``max_area_km2``: a typo in a bbox (a whole
continent instead of a county) would otherwise plan millions of chunks and tiles before anything visible happens."""


class JobSpecError(ValueError):
    """An invalid job spec; the message names the file and each offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeRange(_Strict):
    """Acquisition time range; bare dates cover whole days."""

    # date first: a quoted "2019-09-17" must stay a whole day, not become midnight (an end would lose its day)
    start: date | datetime
    end: date | datetime

    @model_validator(mode="after")
    def _ordered(self) -> TimeRange:
        def as_dt(v: datetime | date) -> datetime:
            return v.replace(tzinfo=None) if isinstance(v, datetime) else datetime(v.year, v.month, v.day)

        if as_dt(self.start) > as_dt(self.end):
            raise ValueError(f"start {self.start} is after end {self.end}")
        return self


class Chunks(_Strict):
    """Zarr chunk shape in pixels of each modality's grid; one date per chunk."""

    y: int = Field(512, gt=0, le=8192)
    x: int = Field(512, gt=0, le=8192)
    time: Literal[1] = 1


class CubeSpec(_Strict):
    """Where the Zarr cube goes (local path or fsspec URL) and how it is chunked.

    Attributes:
        path: local path or fsspec URL.
        chunks: chunk shape.
        max_failed_fraction: a modality with a larger share of chunks that could not be read fails the run (a
            smaller share is a partial result: listed in the summary, exit code 3).
    """

    path: str = Field(min_length=1)
    chunks: Chunks = Chunks()
    max_failed_fraction: float = Field(0.2, ge=0, le=1)


class OutputSpec(_Strict):
    """What the inference stage writes, into the folder ``path`` (default ``outputs/<job name>``).

    Attributes:
        kind: what the job writes (:mod:`pipeline.kinds`); default: the kind a fine-tuned checkpoint was trained
            for, else ``embeddings``.
        path: output folder (local path or fsspec URL): tiles, mosaic, COG, archive, quicklook.
        num_classes: classes of a segmentation head the checkpoint does not carry (a seeded random head).
        class_names: names of the output classes (default ``class_<i>``).
        before, after: change detection periods; default: ``time`` split at its midpoint.

    """

    kind: Annotated[str, AfterValidator(_known_kind)] | None = None
    path: str | None = None
    num_classes: int | None = Field(None, ge=2)
    class_names: list[str] | None = None
    before: TimeRange | None = None
    after: TimeRange | None = None

    @property
    def output_kind(self) -> OutputKind:
        """The kind object (:mod:`pipeline.kinds`); ``embeddings`` until a checkpoint's task has decided it."""
        return get_kind(self.kind or "embeddings")

    @model_validator(mode="after")
    def _consistent(self) -> OutputSpec:
        if (self.before is None) != (self.after is None):
            raise ValueError("give both before and after periods, or neither")
        if self.kind is None:  # the checkpoint's task decides; checked when the job is resolved
            return self
        kind = self.output_kind
        if self.before is not None and kind.periods != 2:
            two = sorted(k.name for k in KINDS.values() if k.periods == 2)
            raise ValueError(f"before/after periods are for two-period kinds {two}, not {self.kind!r}")
        if self.class_names is not None and self.num_classes is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes={self.num_classes}")
        if not kind.takes_classes and (self.num_classes or self.class_names):
            with_classes = sorted(k.name for k in KINDS.values() if k.takes_classes)
            raise ValueError(f"num_classes / class_names are for {with_classes} outputs, not {self.kind!r}")
        return self


class TileSpec(_Strict):
    """Inference tiles in 10 m pixels; neighbouring tiles share ``overlap`` pixels.

    Attributes:
        size: tile side.
        overlap: pixels shared by neighbouring tiles; ``size - overlap`` must be a multiple of 8 (the attention
            window) with local context.
        margin: pixels at each inner tile edge that get zero weight in the mosaic (the model's edge effects);
            default ``overlap // 3``. At most ``overlap / 2``.
        context: ``local`` (default): stages 3-4 attend to a ``radius``-cell neighbourhood, so outputs do not depend
            on where tiles start and the mosaic has no seams; ``global``: attention over the whole tile, as in
            pre-training, but every pixel then carries its tile's context and tile borders can show.
        radius: neighbourhood radius of local context, in grid cells.
    """

    size: int = Field(256, gt=0)
    overlap: int = Field(48, ge=0)
    margin: int | None = Field(None, ge=0)
    context: Literal["local", "global"] = "local"
    radius: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _overlap_fits(self) -> TileSpec:
        if 2 * self.overlap >= self.size:
            raise ValueError(f"overlap {self.overlap} must be less than half the tile size {self.size}")
        if 2 * self.margin_px > self.overlap:
            raise ValueError(f"margin {self.margin_px} must be at most half the overlap {self.overlap}")
        if self.context == "local" and (self.size - self.overlap) % 8:
            raise ValueError(
                f"size - overlap = {self.size - self.overlap} must be a multiple of 8 (the attention window) so that "
                "tiles share one window grid; e.g. size 256 with overlap 48"
            )
        return self

    @property
    def margin_px(self) -> int:
        """The margin in pixels (``overlap // 3`` when not given)."""
        return self.overlap // 3 if self.margin is None else self.margin

    @property
    def context_radius(self) -> int | None:
        """Radius passed to the model (None = global attention)."""
        return self.radius if self.context == "local" else None


class Prices(_Strict):
    """What an hour of compute costs, in US dollars, for the cost estimate in ``report.json``.

    Per CPU and per GPU: a node's hourly price divided by its CPUs (or GPUs) gives these.
    """

    cpu_hour: float = Field(0.0, ge=0)
    gpu_hour: float = Field(0.0, ge=0)


class JobSpec(_Strict):
    """A whole job. Fields after ``cube`` are read by the inference stage and have defaults.

    Attributes:
        name: job name (default: the YAML file's stem).
        region: WGS84 bbox ``[min lon, min lat, max lon, max lat]`` or a GeoJSON file path.
        time: acquisition time range.
        catalog: catalog name (``catalogs/<name>.yaml``) or path to a catalog YAML.
        modalities: modalities to put in the cube (``s2``, ``s1``, ``hr``).
        resolution: metres per modality; S2/S1 default 10 m, HR defaults to its native GSD snapped to
            10 m / (4 * 2**n).
        crs: target projected CRS (EPSG code or ``EPSG:xxxx``); default the UTM zone of the region centre.
        max_cloud: keep scenes with at most this cloud cover (percent); ``None`` keeps all.
        cube: cube path and chunking.
        checkpoint: model checkpoint path or model name (inference).
        output: what inference writes and where.
        tiles: inference tile size and overlap.
        batch_size: tiles per model call.
        actors: inference actors (Ray).
        gpus_per_actor: GPUs per actor (fractions allowed; 0 runs on CPU).
        batch_timeout_s: seconds one batch may run on an actor before the actor counts as hung: it is killed and
            restarted, and the batch's tiles are retried (``null``: wait forever).
        actor_start_timeout_s: seconds to wait for the first inference actor to start (a cluster without a node
            that has the requested CPUs/GPUs fails after this instead of waiting forever).
        max_area_km2: refuse regions larger than this (a guard against a mistyped bbox; raise it for big jobs).
        prices: US dollars per CPU-hour and GPU-hour; the run's ``report.json`` then carries an estimated cost.

    """

    name: str | None = None
    region: tuple[float, float, float, float] | str
    time: TimeRange
    catalog: str = Field(min_length=1)
    modalities: list[Modality] = Field(min_length=1)
    resolution: dict[Modality, float | None] = Field(default_factory=dict)
    crs: str | None = None
    max_cloud: float | None = Field(None, ge=0, le=100)
    cube: CubeSpec
    checkpoint: str | None = None
    output: OutputSpec = OutputSpec()
    tiles: TileSpec = TileSpec()
    batch_size: int = Field(8, gt=0)
    actors: int = Field(1, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    batch_timeout_s: float | None = Field(1800.0, gt=0)
    actor_start_timeout_s: float | None = Field(600.0, gt=0)
    max_area_km2: float = Field(DEFAULT_MAX_AREA_KM2, gt=0)
    prices: Prices | None = None

    @field_validator("region")
    @classmethod
    def _region(cls, v: tuple[float, float, float, float] | str) -> tuple[float, float, float, float] | str:
        if isinstance(v, str):
            return v
        minx, miny, maxx, maxy = v
        if not all(math.isfinite(c) for c in v):
            raise ValueError("bbox values must be finite numbers")
        if not (-180 <= minx < maxx <= 180 and -90 <= miny < maxy <= 90):
            raise ValueError(f"bbox {list(v)} must be [min lon, min lat, max lon, max lat] in degrees with min < max")
        return v

    @field_validator("modalities")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"modalities must not repeat, got {v}")
        return v

    @field_validator("crs", mode="before")
    @classmethod
    def _crs(cls, v: Any) -> str | None:
        return None if v is None else normalize_crs(v)

    @model_validator(mode="after")
    def _resolutions(self) -> JobSpec:
        for name, res in self.resolution.items():
            if name not in self.modalities:
                raise ValueError(f"resolution given for {name!r}, which is not in modalities {self.modalities}")
            if res is None:
                continue
            if not res > 0:
                raise ValueError(f"resolution.{name} must be positive, got {res}")
            DEFAULT_MODALITIES[name].check_resolution(res)
        return self

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """The region's WGS84 bounding box (read from the GeoJSON file when the region is one)."""
        if isinstance(self.region, str):
            return geojson_bbox(self.region)
        return self.region

    @property
    def area_km2(self) -> float:
        """Approximate area of the region's bounding box in km2 (spherical Earth)."""
        return bbox_area_km2(self.bbox)

    def with_checkpoint_kind(self) -> JobSpec:
        """The job with ``output.kind`` decided: as written, else the kind the checkpoint was fine-tuned for.

        Raises:
            JobSpecError: the job's other output fields do not fit the checkpoint's kind.
        """
        if self.output.kind is not None:
            return self
        from pipeline.infer.task import checkpoint_kind  # reads the checkpoint: only when the job runs

        kind = checkpoint_kind(self.checkpoint) or "embeddings"
        data = self.model_dump()
        data["output"]["kind"] = kind
        try:
            return JobSpec.model_validate(data)
        except ValidationError as err:
            where = f"job {self.name} (output.kind {kind!r} from its checkpoint)"
            raise JobSpecError(_format_errors(where, err)) from None

    @property
    def output_path(self) -> str:
        """The output folder (``output.path``, default ``outputs/<name>``)."""
        return self.output.path or f"outputs/{self.name}"

    def periods(self) -> list[tuple[date | datetime, date | datetime]]:
        """The time periods the output kind takes.

        ``time`` itself; for two-period kinds (change) ``output.before`` and ``output.after``, or ``time`` split at
        its midpoint [ours].
        """
        start, end = self.time.start, self.time.end
        if self.output.output_kind.periods == 1:
            return [(start, end)]
        if self.output.before is not None and self.output.after is not None:
            before, after = self.output.before, self.output.after
            return [(before.start, before.end), (after.start, after.end)]
        if not isinstance(start, datetime) and not isinstance(end, datetime):
            mid = start + (end - start) / 2
            return [(start, mid), (mid + timedelta(days=1), end)]
        s = start if isinstance(start, datetime) else datetime(start.year, start.month, start.day)
        e = end if isinstance(end, datetime) else datetime(end.year, end.month, end.day, 23, 59, 59)
        mid = s + (e - s) / 2
        return [(s, mid), (mid + timedelta(microseconds=1), e)]


def bbox_area_km2(bbox: tuple[float, float, float, float]) -> float:
    """Area in km2 of a WGS84 lon/lat box on a sphere of radius 6371 km."""
    minx, miny, maxx, maxy = bbox
    r = 6371.0
    return r * r * math.radians(maxx - minx) * abs(math.sin(math.radians(maxy)) - math.sin(math.radians(miny)))


def geojson_bbox(path: str | os.PathLike[str]) -> tuple[float, float, float, float]:
    """Bounding box of all coordinates in a GeoJSON file (Geometry, Feature or FeatureCollection, WGS84)."""
    obj = json.loads(Path(path).read_text())
    crs_name = ((obj.get("crs") or {}).get("properties") or {}).get("name", "")
    if crs_name and not any(s in crs_name.upper() for s in ("CRS84", "4326")):
        raise ValueError(f"{path}: GeoJSON CRS {crs_name!r} is not WGS84 lon/lat")
    xs: list[float] = []
    ys: list[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("features", "geometry", "geometries", "coordinates"):
                if key in node:
                    walk(node[key])
        elif isinstance(node, list) and node and isinstance(node[0], (int, float)):
            xs.append(float(node[0]))
            ys.append(float(node[1]))
        elif isinstance(node, list):
            for n in node:
                walk(n)

    walk(obj)
    if not xs:
        raise ValueError(f"{path}: no coordinates found in the GeoJSON")
    return min(xs), min(ys), max(xs), max(ys)


def _looks_like_path(s: str) -> bool:
    return s.endswith((".yaml", ".yml", ".json", ".geojson")) or "/" in s or os.sep in s


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid job spec:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "union[", "tuple[")))
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown field (not part of the job spec; check the spelling)")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  - {loc or '<top level>'}: {msg}{shown}")
    return "\n".join(lines)


def spec_command(data: Mapping[str, Any]) -> str | None:
    """The command a spec mapping is written for, judged by its top-level keys (None: cannot tell).

    Region jobs, pre-training, fine-tuning and eval test data are all YAML files in ``jobs/``; handing one to the
    wrong command would otherwise list every field as missing or unknown instead of naming the mix-up.
    """
    keys = set(data)
    if "task" in keys:
        return "skypipe finetune"
    if "ssl" in keys or {"model", "steps"} <= keys:
        return "skypipe pretrain"
    if {"format", "path"} <= keys:
        return "skypipe eval <task> --test"
    if {"region", "cube"} <= keys:
        return "skypipe run"
    return None


def wrong_command(data: Mapping[str, Any], source: str, expected: str) -> str | None:
    """The one-line error for a spec of another command (None when it is not one)."""
    command = spec_command(data)
    if command is None or command == expected:
        return None
    return f"{source} is a spec for `{command}`, not for `{expected}`; run `{command} {source}`"


def parse_job(data: Any, source: str = "<job spec>", base_dir: str | os.PathLike[str] | None = None) -> JobSpec:
    """Validate an already-parsed YAML mapping; relative input paths are resolved against ``base_dir``."""
    if not isinstance(data, dict):
        raise JobSpecError(f"{source}: a job spec must be a YAML mapping, got {type(data).__name__}")
    mixup = wrong_command(data, source, "skypipe run")
    if mixup:
        raise JobSpecError(mixup)
    data = dict(data)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    for key in ("region", "catalog"):
        value = data.get(key)
        if isinstance(value, str) and _looks_like_path(value) and "://" not in value:
            path = Path(value).expanduser()
            path = path if path.is_absolute() else (base / path)
            if not path.exists():
                raise JobSpecError(f"{source}: {key}: file {value!r} not found (looked at {path})")
            data[key] = str(path.resolve())
    if not data.get("name"):
        data["name"] = Path(source).stem if source != "<job spec>" else "job"
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as err:
        raise JobSpecError(_format_errors(source, err)) from None
    if isinstance(job.region, str):
        try:
            geojson_bbox(job.region)
        except (ValueError, OSError) as err:
            raise JobSpecError(f"{source}: region: {err}") from None
    if job.area_km2 > job.max_area_km2:
        raise JobSpecError(
            f"{source}: region: covers {job.area_km2:,.0f} km2, more than max_area_km2 = {job.max_area_km2:,.0f}; "
            "check the bbox (min lon, min lat, max lon, max lat), or raise max_area_km2 in the job spec"
        )
    return job


def load_job(path: str | os.PathLike[str]) -> JobSpec:
    """Read and validate a job YAML file; errors name the file, the field and what was wrong."""
    p = Path(path)
    if not p.is_file():
        raise JobSpecError(f"job spec {str(path)!r} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise JobSpecError(f"{path}:{where}: not valid YAML: {problem}") from None
    return parse_job(data, source=str(path), base_dir=p.parent)
