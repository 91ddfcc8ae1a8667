"""Tiny cubes, checkpoints and job files for the inference tests, from real Sentinel-2 pixels.

The cube follows the cube stage's layout (one Zarr v3 group per modality, ``data`` (time, band, y, x) float32 in
the modality's units, ``valid`` (time, y, x) uint8, CRS via ``rio.write_crs``). Its S2 pixels are the eo-learn
Slovenia L1C reference scenes (EPSG:32633; two of the five dates are fully cloudy and marked invalid) placed on an
exact 10 m grid at the scenes' origin: the source pixels are 9.995 m, so this is a 0.05 % stretch, not a
reprojection. The HR group (2.5 m) is the same scenes' B04/B03/B02 scaled to 0-255 and repeated 4 x 4, so an HR
window can be checked against the S2 window of the same ground. A corner block is nodata in every modality and
date, so some tiles have no valid input at all.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import rasterio
import rioxarray  # noqa: F401
import torch
import xarray as xr
import yaml
import zarr
from affine import Affine
from shared_data import require, shared_path

from pipeline.modalities import HR, S2
from pipeline.model import create_model
from pipeline.model.checkpoint import save_checkpoint

SCENES = shared_path("eolearn_slovenia/reference_scenes")
DATES = ["2015-07-11", "2015-07-31", "2015-08-20", "2015-08-30", "2015-09-09"]
CLOUDY = {"2015-07-31", "2015-08-20"}
CRS = "EPSG:32633"
ORIGIN = (465180.0, 5080250.0)  # the scenes' top-left snapped to 10 m
MICRO = {"dims": (32, 64, 96, 128), "depths": (1, 1, 1, 1), "fusion_dim": 64, "fusion_heads": 2}
HR_RATIO = 4


def load_s2(size: tuple[int, int]) -> np.ndarray:
    """(T, 10, H, W) float32 L1C reflectance x 10000 in the model's S2 band order (skips without the data)."""
    require("eolearn_slovenia/reference_scenes")
    out = []
    for d in DATES:
        with rasterio.open(SCENES / f"S2L1C_{d.replace('-', '')}.tif") as src:
            names = list(src.descriptions)
            arr = src.read([names.index(b) + 1 for b in S2.bands])[:, : size[0], : size[1]]
        out.append(np.round(arr * 10000).astype(np.float32))
    return np.stack(out)


def _group(data: np.ndarray, valid: np.ndarray, bands: tuple[str, ...], res: float, units: str) -> xr.Dataset:
    T, _, H, W = data.shape
    x0, y0 = ORIGIN
    ds = xr.Dataset(
        {
            "data": (("time", "band", "y", "x"), data, {"units": units}),
            "valid": (("time", "y", "x"), valid.astype(np.uint8)),
        },
        coords={
            "time": np.array(DATES[:T], dtype="datetime64[ns]"),
            "band": np.array(bands, dtype=object),
            "y": y0 - res * (np.arange(H) + 0.5),
            "x": x0 + res * (np.arange(W) + 0.5),
        },
        attrs={"units": units, "valid_fraction": [float(v.mean()) for v in valid]},
    )
    ds = ds.rio.write_crs(CRS).rio.write_transform(Affine(res, 0.0, x0, 0.0, -res, y0))
    ds["data"].encoding.update(chunks=(1, len(bands), min(H, 32 * int(10 / res)), min(W, 32 * int(10 / res))))
    ds["valid"].encoding.update(chunks=(1, min(H, 32 * int(10 / res)), min(W, 32 * int(10 / res))))
    return ds


def write_cube(path: Path, size: tuple[int, int] = (64, 64), hr: bool = False, nodata_corner: int = 24) -> str:
    """A small cube at ``path`` (S2, optionally HR); the bottom-right ``nodata_corner`` pixels are nodata."""
    s2 = load_s2(size)
    valid = np.ones((len(DATES), *size), dtype=bool)
    for t, d in enumerate(DATES):
        valid[t] &= d not in CLOUDY
    if nodata_corner:
        s2[:, :, -nodata_corner:, -nodata_corner:] = np.nan
        valid[:, -nodata_corner:, -nodata_corner:] = False
    url = str(path)
    zarr.open_group(url, mode="w", zarr_format=3, attributes={"modalities": ["s2", "hr"] if hr else ["s2"]})
    _group(s2, valid, S2.bands, 10.0, S2.units).to_zarr(url, group="s2", mode="a", zarr_format=3, consolidated=False)
    if hr:
        rgb = np.clip(s2[:1, [2, 1, 0]] / 3000 * 255, 0, 255)
        rgb = rgb.repeat(HR_RATIO, axis=2).repeat(HR_RATIO, axis=3)
        hv = valid[:1].repeat(HR_RATIO, axis=1).repeat(HR_RATIO, axis=2)
        hds = _group(rgb.astype(np.float32), hv, HR.bands, 10.0 / HR_RATIO, HR.units)
        hds.to_zarr(url, group="hr", mode="a", zarr_format=3, consolidated=False)
    return url


def write_checkpoint(path: Path) -> str:
    """A micro SkySense V2 (random, seed 0) saved as a self-describing checkpoint."""
    torch.manual_seed(0)
    model = create_model("skysense_v2_tiny", **MICRO)
    save_checkpoint(model, path, provenance={"note": "random micro model for tests"})
    return str(path)


def write_job(path: Path, cube: str, out: str, checkpoint: str, **overrides: object) -> Path:
    """A job YAML over the Slovenia patch for an existing cube."""
    job = {
        "name": "infer-test",
        "region": [14.5513, 45.8659, 14.5643, 45.8750],
        "time": {"start": date(2015, 7, 1), "end": date(2015, 9, 30)},  # bare YAML dates: whole days
        "catalog": "local-slovenia",
        "modalities": ["s2"],
        "crs": CRS,
        "cube": {"path": cube, "chunks": {"y": 32, "x": 32}},
        "checkpoint": checkpoint,
        "output": {"kind": "embeddings", "path": out},
        "tiles": {"size": 24, "overlap": 8},  # local context (the default), margin 2: 4 x 4 tiles on 64 x 64
        "batch_size": 2,
        "actors": 1,
        "gpus_per_actor": 0,
    }
    job.update(overrides)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path
