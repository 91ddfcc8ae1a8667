"""The pre-training job spec: YAML parsed and validated once, here; the loop receives plain values.

Example (``jobs/pretrain-tiny.yaml``)::

    name: pretrain-tiny
    model: {name: skysense_v2_tiny}
    data:
      - {kind: images, path: ../shared/data/rsscn7, size: 64, gsd: 0.625}
      - {kind: change_pairs, path: ../shared/data/levir_cd, size: 64, region: [-97.74, 30.27]}  # Texas
      - {kind: bigearthnet, path: ../shared/data/bigearthnet_v1, size: 16, weight: 0.5}
      - {kind: cube, path: outputs/cube-slovenia.zarr, size: 16, num_dates: 2}
    steps: 2000
    batch_size: 32            # global samples per optimiser step
    accumulation: 1
    optim: {lr: 5.0e-4, warmup_steps: 100}
    workers: 2
    storage: outputs/pretrain-tiny    # local path or fsspec URL

Relative paths (data and storage) are resolved against the current directory when the spec is loaded, so Ray
workers (which run elsewhere) see absolute paths.

GCPL regions (:mod:`pipeline.ssl.regions`): cube samples get the region of their window's location. Sources without
georeference take ``region``: a ``[lon, lat]`` position in degrees (binned like a georeferenced sample) or a region
id; without it their samples get the unknown-location id. ``ssl.options.num_regions`` sets the number of regions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.model.config import MODEL_CONFIGS, unknown_model_message
from pipeline.ssl.regions import DEFAULT_NUM_REGIONS, check_num_regions, resolve_region


def _absolute(path: str) -> str:
    """Absolute local path, or the URL unchanged (``s3://``, ``gs://``, ``memory://`` ...)."""
    path = os.path.expandvars(os.path.expanduser(path))
    return path if "://" in path else str(Path(path).resolve())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _PathSource(_Strict):
    path: str
    weight: float = Field(1.0, ge=0)

    @field_validator("path")
    @classmethod
    def _abs(cls, v: str) -> str:
        return _absolute(v)


class _UngeoreferencedSource(_PathSource):
    """A source whose files may carry no location: ``region`` says where it lies (see the module docstring)."""

    region: int | tuple[float, float] | None = None

    @field_validator("region")
    @classmethod
    def _region(cls, v: int | tuple[float, float] | None) -> int | tuple[float, float] | None:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"a region id is >= 0, got {v}")
        if isinstance(v, tuple) and not (-180 <= v[0] <= 180 and -90 <= v[1] <= 90):
            raise ValueError(
                f"a region position is [lon, lat] in degrees (lon in [-180, 180], lat in [-90, 90]), got {list(v)}"
            )
        return v


class ImagesSource(_UngeoreferencedSource):
    """A folder tree of RGB images (e.g. RSSCN7) as single-date HR samples."""

    kind: Literal["images"] = "images"
    size: int = Field(64, gt=0)
    gsd: float = Field(0.625, gt=0)
    scale: tuple[float, float] = (0.2, 1.0)


class ChangePairsSource(ImagesSource):
    """``A/``, ``B/`` change pairs (LEVIR-CD, DSIFN-CD) as 2-date HR samples."""

    kind: Literal["change_pairs"] = "change_pairs"  # type: ignore[assignment]


class BigEarthNetSpec(_UngeoreferencedSource):
    """BigEarthNet v1 patch folders as S2 + S1 samples (patches with a CRS use their own location)."""

    kind: Literal["bigearthnet"] = "bigearthnet"
    split: Literal["train", "val", "test"] | None = None
    size: int | None = Field(None, gt=0)


class ScenesSpec(_UngeoreferencedSource):
    """Rasters of known GSD (DOTA scenes, WorldView pairs, S1 chips ...) as scale-varied crops at a target GSD.

    See :mod:`pipeline.train.scenes`: ``format`` says how a raster becomes the modality's units, ``zoom`` how far
    the content may be zoomed away from the declared ``gsd`` (``[1, 1]``: exact).
    """

    kind: Literal["scenes"] = "scenes"
    format: Literal["rgb", "worldview", "grey", "bands"] = "rgb"
    modality: Literal["hr", "s2", "s1"] = "hr"
    size: int = Field(128, gt=0)
    gsd: float | None = Field(None, gt=0)
    zoom: tuple[float, float] = (1.0, 1.0)
    native_gsd: float | None = Field(None, gt=0)
    glob: str | None = None

    @model_validator(mode="after")
    def _grid(self) -> ScenesSpec:
        from pipeline.modalities import GRID_GSD, get_modality

        gsd = self.gsd or get_modality(self.modality).gsd
        cells = self.size * gsd / GRID_GSD
        if abs(cells - round(cells)) > 1e-6 or round(cells) < 1:
            raise ValueError(f"size {self.size} px at {gsd:g} m is not a whole number of {GRID_GSD:g} m grid cells")
        if not 0 < self.zoom[0] <= self.zoom[1]:
            raise ValueError(f"zoom must be [low, high] with 0 < low <= high, got {list(self.zoom)}")
        return self


class CubeSourceSpec(_PathSource):
    """Random windows of a Zarr cube (all its modalities, same footprint)."""

    kind: Literal["cube"] = "cube"
    size: int = Field(16, gt=0)
    modalities: list[str] | None = None
    num_dates: int = Field(4, gt=0)
    min_valid: float = Field(0.5, ge=0, le=1)


DataSource = Annotated[
    ImagesSource | ChangePairsSource | BigEarthNetSpec | ScenesSpec | CubeSourceSpec, Field(discriminator="kind")
]


class ModelSpec(_Strict):
    """Which configuration to build, with overrides (``SkySenseConfig`` fields)."""

    name: str = "skysense_v2_tiny"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MODEL_CONFIGS:
            raise ValueError(unknown_model_message(v))
        return v


class OptimSpec(_Strict):
    """AdamW with linear warm-up then cosine decay; layer-wise lr decay over the backbone depth."""

    lr: float = Field(2e-4, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.04, ge=0)
    layer_decay: float = Field(1.0, gt=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = Field(3.0, gt=0)


class SSLSpec(_Strict):
    """Teacher-student settings.

    EMA momentum schedule, keyword arguments of ``SSLMetaArch`` (``options``) and of its view generator
    ``MultiViewAugment`` (``augment``, e.g. ``{num_local: 2}``).
    """

    momentum: float = Field(0.996, ge=0, le=1)
    momentum_end: float = Field(1.0, ge=0, le=1)
    options: dict[str, Any] = Field(default_factory=dict)
    augment: dict[str, Any] = Field(default_factory=dict)


class PretrainSpec(_Strict):
    """A pre-training job. ``batch_size`` is global (all workers, one optimiser step)."""

    name: str = "pretrain"
    model: ModelSpec = ModelSpec()
    data: list[DataSource] = Field(min_length=1)
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    accumulation: int = Field(1, gt=0)
    optim: OptimSpec = OptimSpec()
    ssl: SSLSpec = SSLSpec()
    workers: int = Field(1, gt=0, description="Ray Train workers (data-parallel ranks)")
    max_failures: int = Field(
        3, ge=-1, description="worker-group restarts after a worker dies (-1: unlimited); each resumes from the "
        "last checkpoint in storage",
    )  # fmt: skip
    cpus_per_worker: int = Field(1, gt=0)
    use_gpu: bool = False
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per Ray worker")
    prefetch: int = Field(4, gt=0)
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    activation_checkpointing: bool | None = None
    compile: bool = False
    storage: str
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    seed: int = 0
    repeat_batch: bool = Field(False, description="debug: every step sees micro-batch 0 with step 0's views")

    @field_validator("storage")
    @classmethod
    def _abs_storage(cls, v: str) -> str:
        return _absolute(v)

    @property
    def num_regions(self) -> int:
        """GCPL regions: ``ssl.options.num_regions``, else the meta-architecture's default."""
        return int(self.ssl.options.get("num_regions", DEFAULT_NUM_REGIONS))

    @model_validator(mode="after")
    def _regions(self) -> PretrainSpec:
        n = self.ssl.options.get("num_regions", DEFAULT_NUM_REGIONS)
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"ssl.options.num_regions must be an integer >= 2, got {n!r}")
        check_num_regions(n)
        for i, d in enumerate(self.data):
            if isinstance(d, _UngeoreferencedSource) and isinstance(d.region, int):
                try:
                    resolve_region(d.region, n)
                except ValueError as err:
                    raise ValueError(f"data[{i}].region: {err}") from None
        return self

    @model_validator(mode="after")
    def _divisible(self) -> PretrainSpec:
        per = self.workers * self.accumulation
        if self.batch_size % per:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by workers x accumulation = {per} "
                "(every rank runs the same micro-batch size)"
            )
        return self

    @property
    def micro_batch(self) -> int:
        """Samples per rank per forward."""
        return self.batch_size // (self.workers * self.accumulation)

    def resolved_parallel(self) -> str:
        """``ddp`` or ``fsdp`` (``auto``: FSDP2 for the huge configuration, DDP otherwise)."""
        if self.parallel != "auto":
            return self.parallel
        return "fsdp" if self.model.name.endswith("huge") else "ddp"

    def resolved_precision(self) -> str:
        """``bf16`` autocast on GPU by default, fp32 on CPU."""
        return ("bf16" if self.use_gpu else "fp32") if self.precision == "auto" else self.precision


def load_pretrain_spec(path: str | Path) -> PretrainSpec:
    """Parse and validate a pre-training YAML; errors name the file and the offending field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"pre-training spec not found: {path}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    try:
        return PretrainSpec.model_validate(raw)
    except Exception as err:
        raise ValueError(f"{path}: invalid pre-training spec:\n{err}") from None
