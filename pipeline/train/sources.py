"""Folders of pre-chipped real samples as training sources.

A *source* returns one sample for ``(index, rng)``: all the randomness of a sample (crop, flips) comes from the
``numpy.random.Generator`` it is handed, so a sample is a pure function of its key and the data order can be
replayed exactly on resume (see :mod:`pipeline.train.data`).

A sample maps each modality present to a dict of tensors, normalised with the model's :class:`ModalitySpec`::

    {"hr": {"x": (T, C, H, W) float32, "doy": (T,) int64 (0 = unknown), "valid": (T, H, W) bool,
            "gsd": () float32}, "s2": {...}, ...}

plus ``"region"``, the () int64 GCPL region id of the sample's location (:mod:`pipeline.ssl.regions`), and, for
labelled sources, ``"label"`` (int64 class index or float32 multi-hot). All modalities of one sample cover the same
ground footprint, so the model can fuse them location by location.

Region: a georeferenced sample bins the lon/lat of its centre; a source without georeference gives every sample
the region its spec entry names (an id or a (lon, lat) position), by default the unknown-location id.
"""

from __future__ import annotations

import datetime as dt
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from affine import Affine
from PIL import Image
from pyproj import Transformer
from torch import Tensor

from pipeline.modalities import ModalitySpec, get_modality
from pipeline.ssl.regions import DEFAULT_NUM_REGIONS, region_id, resolve_region

Sample = dict[str, Any]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


class Source(Protocol):
    """What the mixed dataset needs from a source."""

    modalities: tuple[str, ...]

    def __len__(self) -> int: ...

    def get(self, index: int, rng: np.random.Generator | None) -> Sample:
        """Sample ``index``; augmented with ``rng``, deterministic without."""
        ...


Region = int | Sequence[float] | None
"""What a source without georeference is told about its location: an id, a (lon, lat) position, None = unknown."""


@lru_cache(maxsize=16)
def _to_lonlat(crs: str) -> Transformer:
    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True)


def lonlat(crs: str, x: float, y: float) -> tuple[float, float]:
    """WGS84 ``(lon, lat)`` in degrees of the point ``(x, y)`` of ``crs`` (anything pyproj reads: EPSG code, WKT)."""
    lon, lat = _to_lonlat(str(crs)).transform(x, y)
    return float(lon), float(lat)


@dataclass(frozen=True)
class Georef:
    """Where a raster lies: its CRS and pixel-to-map transform."""

    crs: str
    transform: Affine

    def region(self, row: float, col: float, num_regions: int) -> int:
        """Region id of the (fractional) pixel position ``row``, ``col`` (``0, 0`` = the top-left pixel's corner)."""
        x, y = self.transform @ (col, row)
        return region_id(*lonlat(self.crs, x, y), num_regions)


@lru_cache(maxsize=4096)
def read_georef(path: Path) -> Georef | None:
    """Georeference of a GeoTIFF; None for other files and for TIFFs without a CRS (read once per file)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return Georef(src.crs.to_wkt(), src.transform) if src.crs else None


def region_tensor(region: int) -> Tensor:
    """The ``"region"`` entry of a sample."""
    return torch.tensor(region, dtype=torch.long)


def modality_entry(x: np.ndarray | Tensor, spec: ModalitySpec, gsd: float, doy: Sequence[int] | None = None,
                   valid: np.ndarray | Tensor | None = None) -> dict[str, Tensor]:  # fmt: skip
    """Normalise physical values ``x`` (T, C, H, W) with ``spec``; invalid/non-finite pixels become 0 and invalid."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    T = x.shape[0]
    finite = torch.isfinite(x).all(dim=1)  # (T, H, W)
    v = finite if valid is None else finite & torch.as_tensor(np.asarray(valid)).bool()
    x = torch.nan_to_num(spec.normalize(x, band_axis=1), nan=0.0, posinf=0.0, neginf=0.0)
    x = x * v[:, None]
    d = torch.zeros(T, dtype=torch.long) if doy is None else torch.as_tensor(list(doy), dtype=torch.long)
    return {"x": x.contiguous(), "doy": d, "valid": v, "gsd": torch.tensor(float(gsd))}


def random_box(h: int, w: int, rng: np.random.Generator, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """A square crop (top, left, side, side) covering a random fraction ``scale`` of the image area."""
    side = round(float(np.sqrt(rng.uniform(*scale) * h * w)))
    side = max(1, min(side, h, w))
    return int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side, side


def crop_resize(x: Tensor, box: tuple[int, int, int, int] | None, size: int) -> Tensor:
    """Crop (T, C, H, W) to ``box`` (top, left, h, w) and resize bilinearly (antialiased) to ``size`` x ``size``."""
    if box is not None:
        t, lft, h, w = box
        x = x[..., t : t + h, lft : lft + w]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def random_flip(x: Tensor, rng: np.random.Generator) -> Tensor:
    """Random horizontal/vertical flip and 90-degree rotation of the last two axes (nadir imagery: all valid)."""
    if rng.random() < 0.5:
        x = x.flip(-1)
    if rng.random() < 0.5:
        x = x.flip(-2)
    return x.rot90(int(rng.integers(0, 4)), dims=(-2, -1))


def read_rgb(path: Path) -> np.ndarray:
    """An RGB image as (3, H, W) uint8 (alpha dropped, grey replicated)."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB")).transpose(2, 0, 1)


def read_bands(path: Path, spec: ModalitySpec) -> np.ndarray:
    """(C, H, W) float32 in the spec's band order.

    RGB files (JPEG/PNG) for 3-band HR; otherwise a raster whose band descriptions name the bands (used to select
    and reorder them) or that holds exactly the spec's bands in order.
    """
    if path.suffix.lower() not in (".tif", ".tiff") and spec.bands == ("R", "G", "B"):
        return read_rgb(path).astype(np.float32)
    data, names = _read_tif(path)
    if all(b in names for b in spec.bands):
        return data[[names.index(b) for b in spec.bands]]
    if data.shape[0] == spec.num_bands:
        return data
    raise ValueError(f"{path}: bands {list(names)} do not provide the {spec.name!r} bands {list(spec.bands)}")


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted (a stable order is part of the data order)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class ImageFolderSource:
    """Images (any folder tree, e.g. RSSCN7's one folder per class) as single-date samples of one modality.

    RGB files (JPEG/PNG) are ``hr``; GeoTIFFs of any modality are read with :func:`read_bands`.

    Args:
        root: folder searched recursively.
        size: output side in pixels; ``size * gsd`` should be a multiple of the 10 m grid.
        gsd: ground sampling distance assigned to the output (default: the modality's nominal GSD, 0.625 m for HR).
        scale: crop area fraction range when augmenting (``rng`` given); without ``rng`` the whole image is
            resized (evaluation).
        labels: attach ``label`` = index of the first-level sub-folder (class-per-folder layout).
        spec: the modality (default ``hr``).
        region: location of images without georeference (see :data:`Region`); GeoTIFFs with a CRS use the centre
            of their crop instead.
        num_regions: GCPL regions of the job.

    """

    modalities = ("hr",)

    def __init__(self, root: str | Path, size: int = 128, gsd: float | None = None,
                 scale: tuple[float, float] = (0.2, 1.0), labels: bool = False, spec: ModalitySpec | None = None,
                 region: Region = None, num_regions: int = DEFAULT_NUM_REGIONS) -> None:  # fmt: skip
        self.root = Path(root)
        self.files = list_images(self.root)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")
        self.spec = spec or get_modality("hr")
        self.size, self.gsd, self.scale = size, gsd or self.spec.gsd, scale
        self.modalities = (self.spec.name,)
        self.classes = sorted({p.relative_to(self.root).parts[0] for p in self.files if p.parent != self.root})
        self.labels = labels
        self.region, self.num_regions = resolve_region(region, num_regions), num_regions
        if labels and not self.classes:
            raise ValueError(f"{self.root}: labels need one sub-folder per class")

    def __len__(self) -> int:
        return len(self.files)

    def label(self, index: int) -> int:
        """Class index of sample ``index`` (alphabetical sub-folder order)."""
        return self.classes.index(self.files[index].relative_to(self.root).parts[0])

    def get(self, index: int, rng: np.random.Generator | None = None) -> Sample:
        """Image ``index``: a random crop + flips with ``rng``, else the whole image resized."""
        x = torch.from_numpy(read_bands(self.files[index], self.spec))[None]  # (1, C, H, W)
        box = None if rng is None else random_box(*x.shape[-2:], rng, self.scale)
        region = self._region(self.files[index], box or (0, 0, *x.shape[-2:]))
        x = crop_resize(x, box, self.size)
        if rng is not None:
            x = random_flip(x, rng)
        if self.spec.bands == ("R", "G", "B"):
            x = x.clamp(0, 255)  # bilinear overshoot of 8-bit data
        sample: Sample = {self.spec.name: modality_entry(x, self.spec, self.gsd), "region": region_tensor(region)}
        if self.labels:
            sample["label"] = torch.tensor(self.label(index))
        return sample

    def _region(self, path: Path, box: tuple[int, int, int, int]) -> int:
        """Region of the crop ``box`` (top, left, h, w): its centre's when the file is georeferenced."""
        georef = read_georef(path)
        if georef is None:
            return self.region
        t, lft, h, w = box
        return georef.region(t + h / 2, lft + w / 2, self.num_regions)


class ChangePairSource:
    """Bi-temporal change pairs (``A/<name>``, ``B/<name>``: LEVIR-CD, DSIFN-CD) as 2-date ``hr`` samples.

    Both dates get the same crop and flips, so the pair stays co-registered; the change ``label/`` masks are
    not used (pre-training is unsupervised). PNG/JPEG pairs carry no georeference: every sample gets ``region``
    (see :data:`Region`) of ``num_regions``.
    """

    modalities = ("hr",)

    def __init__(self, root: str | Path, size: int = 128, gsd: float = 0.625, scale: tuple[float, float] = (0.2, 1.0),
                 region: Region = None, num_regions: int = DEFAULT_NUM_REGIONS) -> None:  # fmt: skip
        self.root = Path(root)
        a = {p.name: p for p in list_images(self.root / "A")}
        b = {p.name: p for p in list_images(self.root / "B")}
        self.names = sorted(set(a) & set(b))
        if not self.names:
            raise FileNotFoundError(f"no A/B image pairs with matching names under {self.root}")
        self.pairs = [(a[n], b[n]) for n in self.names]
        self.size, self.gsd, self.scale = size, gsd, scale
        self.spec = get_modality("hr")
        self.region = resolve_region(region, num_regions)

    def __len__(self) -> int:
        return len(self.pairs)

    def get(self, index: int, rng: np.random.Generator | None = None) -> Sample:
        """Pair ``index`` as dates (A, B), both cropped and flipped alike."""
        a, b = (read_rgb(p) for p in self.pairs[index])
        h, w = min(a.shape[1], b.shape[1]), min(a.shape[2], b.shape[2])
        x = torch.from_numpy(np.stack([a[:, :h, :w], b[:, :h, :w]]))  # (2, 3, H, W)
        box = None if rng is None else random_box(h, w, rng, self.scale)
        x = crop_resize(x, box, self.size)
        if rng is not None:
            x = random_flip(x, rng)
        return {"hr": modality_entry(x.clamp(0, 255), self.spec, self.gsd), "region": region_tensor(self.region)}


def _read_tif(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return src.read().astype(np.float32), tuple(d or f"b{i + 1}" for i, d in enumerate(src.descriptions))


def _doy_from_s2_name(name: str) -> int:
    """Day of year from a Sentinel-2 product name (``S2A_MSIL2A_20170613T101031_...``); 0 if unparsable."""
    try:
        return dt.datetime.strptime(name.split("_")[2][:8], "%Y%m%d").timetuple().tm_yday
    except (IndexError, ValueError):
        return 0


class BigEarthNetSource:
    """BigEarthNet v1 patch folders (``S1.tif``, ``S2_10m.tif``, ``S2_20m.tif``, ``labels.json``) as ``s1`` + ``s2``.

    S2: the 10 m bands and the 20 m bands (bilinearly upsampled x2) are stacked in the model's order B02..B12;
    B01/B09 (60 m) are not model bands. S1: VV/VH dB as stored. The S2 date (day of year) comes from the patch
    name; the S1 date is not stored (doy 0 = unknown). ``label`` is the 19-class multi-hot vector.

    Args:
        root: the ``bigearthnet_v1`` folder (patch folders + ``classes.json``).
        split: keep patches of this ``split_in_configilm_mock`` value (``train``/``val``/``test``); None = all.
        size: crop side (pixels at 10 m): random when augmenting (``rng`` given), else centred; None = the whole
            120 x 120 patch.
        region: location of patches without georeference (see :data:`Region`); patches whose ``S2_10m.tif`` has
            a CRS (the original BigEarthNet) use the centre of their crop instead.
        num_regions: GCPL regions of the job.

    """

    modalities = ("s2", "s1")

    def __init__(self, root: str | Path, split: str | None = None, size: int | None = None, region: Region = None,
                 num_regions: int = DEFAULT_NUM_REGIONS) -> None:  # fmt: skip
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"BigEarthNet folder not found: {self.root}")
        self.patches = sorted(p.parent for p in self.root.glob("*/labels.json"))
        if split is not None:
            self.patches = [p for p in self.patches if self._meta(p).get("split_in_configilm_mock") == split]
        if not self.patches:
            raise FileNotFoundError(f"no BigEarthNet patches (split {split!r}) under {self.root}")
        self.classes: list[str] = json.loads((self.root / "classes.json").read_text())["classes_19"]
        self.size = size
        self.s2, self.s1 = get_modality("s2"), get_modality("s1")
        self.region, self.num_regions = resolve_region(region, num_regions), num_regions

    @staticmethod
    def _meta(patch: Path) -> dict[str, Any]:
        return json.loads((patch / "labels.json").read_text())

    def __len__(self) -> int:
        return len(self.patches)

    def labels(self, index: int) -> Tensor:
        """19-class multi-hot vector (float32) of patch ``index``."""
        names = self._meta(self.patches[index])["labels_19"]
        y = torch.zeros(len(self.classes))
        y[[self.classes.index(n) for n in names]] = 1.0
        return y

    def read_s2(self, patch: Path) -> np.ndarray:
        """(10, 120, 120) L2A reflectance x 10000 in the model's band order."""
        b10, names10 = _read_tif(patch / "S2_10m.tif")
        b20, names20 = _read_tif(patch / "S2_20m.tif")
        up = F.interpolate(torch.from_numpy(b20)[None], size=b10.shape[-2:], mode="bilinear", align_corners=False)
        bands = dict(zip(names10, b10)) | dict(zip(names20, up[0].numpy()))
        return np.stack([bands[b] for b in self.s2.bands])

    def get(self, index: int, rng: np.random.Generator | None = None) -> Sample:
        """Patch ``index`` as ``s2`` + ``s1`` (+ ``label``), cropped when ``size`` is set."""
        patch = self.patches[index]
        s2 = torch.from_numpy(self.read_s2(patch))[None]  # (1, 10, H, W)
        s1_raw, names = _read_tif(patch / "S1.tif")
        s1 = torch.from_numpy(s1_raw[[names.index(b) for b in self.s1.bands]])[None]  # (1, 2, H, W)
        centre = (s2.shape[-2] / 2, s2.shape[-1] / 2)  # (row, col) in 10 m pixels of the patch
        if self.size is not None:  # random crop + flips when augmenting, else the centre crop
            n = min(self.size, s2.shape[-1])
            if rng is not None:
                t, lft = (int(rng.integers(0, d - n + 1)) for d in s2.shape[-2:])
            else:
                t, lft = ((d - n) // 2 for d in s2.shape[-2:])
            both = torch.cat([s2, s1], 1)[..., t : t + n, lft : lft + n]
            both = random_flip(both, rng) if rng is not None else both
            s2, s1 = both[:, : s2.shape[1]], both[:, s2.shape[1] :]
            centre = (t + n / 2, lft + n / 2)
        doy = _doy_from_s2_name(patch.name)
        georef = read_georef(patch / "S2_10m.tif")
        region = self.region if georef is None else georef.region(*centre, self.num_regions)
        return {
            "s2": modality_entry(s2, self.s2, 10.0, doy=[doy]),
            "s1": modality_entry(s1, self.s1, 10.0),
            "label": self.labels(index),
            "region": region_tensor(region),
        }
