"""The three input modalities as data: band order, units, normalisation and ground sampling distance.

This is the single source of truth used by the catalog configs, the cube layout, the model tokenizers and the
checkpoints. Nothing downstream branches on a modality's name: it looks up a :class:`ModalitySpec`.

Normalisation statistics follow the SkySense family [v1 code]: HR is scaled by 1/255 then ImageNet mean/std;
S2 is raw L2A surface reflectance x 10000 standardised with the SSL4EO-S12 L2A statistics (the B02..B12 subset);
S1 is backscatter in dB with the SSL4EO-S12 S1 statistics.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np

GRID_GSD = 10.0
"""Footprint in metres of one token of the shared stage-3/4 grid: one 10 m Sentinel pixel [ours]."""

HR_GSDS: tuple[float, ...] = tuple(GRID_GSD / (4 * 2**n) for n in range(4))
"""HR pixel sizes the model accepts: 2.5, 1.25, 0.625 and 0.3125 m. HR is tokenised in 4 x 4 patches and its tokens
are merged 2 x 2 up to three times before they meet the 10 m tokens, so an HR pixel must be ``10 m / (4 * 2**n)``."""

SENTINEL_GSDS: tuple[float, ...] = tuple(GRID_GSD * 2.0**k for k in range(-2, 4))
"""Resolutions accepted for S2 / S1 cubes: 2.5 ... 80 m, powers of two around the 10 m grid."""


@dataclass(frozen=True)
class ModalitySpec:
    """What one modality's input tensor means.

    Attributes:
        name: short key (``hr``, ``s2``, ``s1``) used everywhere: catalog configs, cube groups, model modules.
        bands: band names in the order the model expects them.
        units: physical units of the values fed to :meth:`normalize` (before normalisation).
        mean: per-band mean subtracted during normalisation (in ``units``).
        std: per-band standard deviation (in ``units``).
        gsd: nominal ground sampling distance in metres.
        temporal: whether the modality is a time series (S2, S1) or usually a single acquisition (HR): a single
            acquisition outside the job's time range is still used (a basemap), and training samples take one date.
        nodata: value marking missing pixels in the source data; None means NaN marks them (float cubes).
        family: ``optical`` (colour jitter in pre-training) or ``sar`` (speckle).
        patch_size: tokenizer patch side in pixels.
        resolutions: cube pixel sizes (metres) the model accepts for this modality.
        default_resolution: cube pixel size when the job gives none; ``None``: the source's native GSD snapped to
            the nearest of ``resolutions``.
        snap_resolution: a requested resolution is snapped to the nearest allowed one (HR imagery comes at any
            GSD) instead of being refused when it is not one of ``resolutions``.
        quicklook: three channels of the modality's RGB picture: band names, or ``A-B`` for a band difference.
        optional_bands: bands a catalog may also feed after ``bands`` (a model variant may use them, e.g. HR NIR).

    """

    name: str
    bands: tuple[str, ...]
    units: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    gsd: float
    temporal: bool = True
    nodata: float | None = None
    description: str = field(default="", compare=False)
    family: Literal["optical", "sar"] = "optical"
    patch_size: int = 1
    resolutions: tuple[float, ...] = SENTINEL_GSDS
    default_resolution: float | None = GRID_GSD
    snap_resolution: bool = False
    quicklook: tuple[str, str, str] | None = None
    optional_bands: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (len(self.bands) == len(self.mean) == len(self.std)):
            raise ValueError(
                f"modality {self.name!r}: {len(self.bands)} bands but {len(self.mean)} means and {len(self.std)} stds"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"modality {self.name!r}: std must be positive, got {self.std}")
        if not self.resolutions or any(r <= 0 for r in self.resolutions):
            raise ValueError(f"modality {self.name!r}: resolutions must be positive, got {self.resolutions}")

    @property
    def known_bands(self) -> tuple[str, ...]:
        """Every band a catalog may feed for this modality, in order: the model's bands, then optional ones."""
        return (*self.bands, *self.optional_bands)

    def nearest_resolution(self, gsd: float) -> float:
        """The allowed resolution nearest to ``gsd`` in log space."""
        if not gsd > 0:
            raise ValueError(f"modality {self.name!r}: GSD must be positive, got {gsd}")
        return min(self.resolutions, key=lambda g: abs(math.log(gsd / g)))

    def check_resolution(self, res: float) -> float:
        """A requested cube resolution, snapped when the modality snaps, else checked against ``resolutions``.

        Raises:
            ValueError: naming the allowed resolutions.
        """
        if self.snap_resolution:
            return self.nearest_resolution(float(res))
        if float(res) not in self.resolutions:
            raise ValueError(f"resolution.{self.name} must be one of {list(self.resolutions)} m, got {res}")
        return float(res)

    @property
    def num_bands(self) -> int:
        """Number of input channels."""
        return len(self.bands)

    def normalize(self, x: np.ndarray | Any, band_axis: int = -3) -> Any:
        """Standardise ``x`` (numpy array or torch tensor) in place-free fashion along ``band_axis``."""
        shape = [1] * x.ndim
        shape[band_axis] = self.num_bands
        if x.shape[band_axis] != self.num_bands:
            raise BandMismatchError(self.name, self.bands, got=x.shape[band_axis])
        mean = np.asarray(self.mean, dtype=np.float32).reshape(shape)
        std = np.asarray(self.std, dtype=np.float32).reshape(shape)
        if isinstance(x, np.ndarray):
            return (x.astype(np.float32) - mean) / std
        import torch  # local: keep this module importable without torch for catalog-only tools

        return (x.float() - torch.as_tensor(mean, device=x.device)) / torch.as_tensor(std, device=x.device)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form stored inside checkpoints and Zarr attributes."""
        d = asdict(self)
        d["bands"] = list(self.bands)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        for key in ("resolutions", "optional_bands"):
            d[key] = list(d[key])
        d["quicklook"] = None if self.quicklook is None else list(self.quicklook)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModalitySpec:
        """Inverse of :meth:`to_dict`; facts missing from older dicts come from the default modality of that name."""
        d = dict(d)
        default = DEFAULT_MODALITIES.get(d.get("name", ""))
        if default is not None:
            d = {f.name: getattr(default, f.name) for f in fields(cls) if f.name not in d} | d
        d["bands"] = tuple(d["bands"])
        d["mean"] = tuple(float(v) for v in d["mean"])
        d["std"] = tuple(float(v) for v in d["std"])
        for key in ("resolutions", "optional_bands", "quicklook"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    def with_bands(self, bands: tuple[str, ...] | list[str]) -> ModalitySpec:
        """A copy restricted/reordered to ``bands`` (statistics follow their bands)."""
        missing = [b for b in bands if b not in self.bands]
        if missing:
            raise ValueError(f"modality {self.name!r} has no bands {missing}; known bands: {list(self.bands)}")
        idx = [self.bands.index(b) for b in bands]
        return replace(
            self,
            bands=tuple(bands),
            mean=tuple(self.mean[i] for i in idx),
            std=tuple(self.std[i] for i in idx),
        )


class BandMismatchError(ValueError):
    """Input bands do not match what a model or checkpoint expects."""

    def __init__(self, modality: str, expected: tuple[str, ...], got: int | tuple[str, ...] | list[str]) -> None:
        detail = f"got {got} band(s)" if isinstance(got, int) else f"got bands {list(got)}"
        super().__init__(
            f"modality {modality!r}: expected {len(expected)} bands in this order {list(expected)}, {detail}. "
            "Reorder or select the input bands to match (the order is stored in the checkpoint)."
        )
        self.modality = modality
        self.expected = expected


DEFAULT_MODALITIES: dict[str, ModalitySpec] = {}
"""The modalities a SkySense V2 model knows by default, keyed by name (order = fusion order); filled below."""

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

HR = ModalitySpec(
    name="hr",
    bands=("R", "G", "B"),
    units="8-bit DN (0-255)",
    # [v1 code] /255 then ImageNet statistics == standardise DN with mean*255, std*255.
    mean=tuple(255.0 * m for m in _IMAGENET_MEAN),
    std=tuple(255.0 * s for s in _IMAGENET_STD),
    gsd=0.625,
    temporal=False,
    description="high-resolution optical RGB (any GSD ~0.1-2.5 m; resampled to a power-of-two fraction of the grid)",
    patch_size=4,
    resolutions=HR_GSDS,
    default_resolution=None,
    snap_resolution=True,
    quicklook=("R", "G", "B"),
    optional_bands=("N",),
)

# [ours] NIR for RGBN imagery: ImageNet has no NIR; use the mean/std of the red channel as a neutral choice.
HR_RGBN = replace(
    HR,
    bands=("R", "G", "B", "N"),
    mean=(*HR.mean, HR.mean[0]),
    std=(*HR.std, HR.std[0]),
    optional_bands=(),
)

S2 = ModalitySpec(
    name="s2",
    bands=("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"),
    units="L2A surface reflectance x 10000",
    mean=(884.2967, 1144.1620, 1297.4729, 1624.9099, 2194.6423, 2422.2125, 2517.7605, 2581.6469, 2368.5124, 1805.0685),
    std=(1155.1517, 1183.6293, 1368.1135, 1370.2650, 1355.5539, 1416.5149, 1474.7890, 1439.3086, 1455.5208, 1343.4838),
    gsd=10.0,
    description="Sentinel-2 L2A, 10 bands resampled to 10 m",
    quicklook=("B04", "B03", "B02"),  # true colour
)

S1 = ModalitySpec(
    name="s1",
    bands=("VV", "VH"),
    units="sigma0 backscatter in dB",
    mean=(-12.5485, -20.1924),
    std=(5.2570, 5.9115),
    gsd=10.0,
    description="Sentinel-1 IW GRD, VV and VH in dB",
    family="sar",
    quicklook=("VV", "VH", "VV-VH"),  # false colour; VV-VH in dB is the VV/VH ratio
)

DEFAULT_MODALITIES.update({m.name: m for m in (HR, S2, S1)})


def get_modality(name: str) -> ModalitySpec:
    """Look up a default modality by name with a clear error."""
    try:
        return DEFAULT_MODALITIES[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; known: {sorted(DEFAULT_MODALITIES)}") from None
