"""A human summary of a cube: modalities, dates, shape, CRS, resolution and valid fraction per date."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from pipeline.cube import layout
from pipeline.cube.layout import open_modality
from pipeline.storage import store_path


def cube_info(url: str) -> dict[str, Any]:
    """Structured summary of the cube at ``url`` (valid fractions computed chunk by chunk if not stored)."""
    try:
        root = zarr.open_group(store_path(url), mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise FileNotFoundError(f"no Zarr cube at {url}") from err
    attrs = dict(root.attrs)
    if "modalities" not in attrs:
        raise ValueError(f"{url} is a Zarr group but not a skypipe cube (no 'modalities' attribute)")
    out: dict[str, Any] = {"url": url, **{k: attrs.get(k) for k in ("region", "crs", "grid", "code_version")}}
    out["modalities"] = {}
    for name in attrs["modalities"]:
        ds = open_modality(url, name)
        data = ds[layout.DATA_VAR]
        fractions = ds.attrs.get("valid_fraction")
        if fractions is None:  # unfinished build
            fractions = layout.valid_fractions(root[f"{name}/{layout.VALID_VAR}"])
        out["modalities"][name] = {
            "shape": dict(data.sizes),
            "chunks": list(data.encoding.get("chunks", ())),
            "bands": [str(b) for b in ds["band"].values],
            "dates": [str(np.datetime_as_string(t, unit="s")) for t in ds["time"].values],
            "crs": str(ds.rio.crs),
            "resolution": abs(float(ds.rio.transform().a)),
            "transform": list(ds.rio.transform())[:6],
            "units": ds.attrs.get("units"),
            "processing_level": ds.attrs.get("processing_level"),
            "valid_fraction": fractions,
            "failed_chunks": len(ds.attrs.get("failures", [])),
        }
    return out


def format_info(info: dict[str, Any]) -> str:
    """Text rendering of :func:`cube_info`."""
    grid = info.get("grid") or {}
    lines = [
        f"cube {info['url']}  ({info.get('code_version')})",
        f"  region (lon/lat) {info.get('region')}",
        f"  crs {info.get('crs')}  10 m grid bounds {grid.get('bounds')}  shape {grid.get('shape')}",
    ]
    for name, m in info["modalities"].items():
        s = m["shape"]
        lines.append(
            f"[{name}] {s['time']} date(s) x {s['band']} band(s) x {s['y']} x {s['x']} px at {m['resolution']:g} m, "
            f"{m['crs']}, chunks {m['chunks']}"
        )
        lines.append(f"  bands {', '.join(m['bands'])}  units: {m['units']}  level: {m['processing_level'] or '-'}")
        if m["failed_chunks"]:
            lines.append(f"  {m['failed_chunks']} chunk(s) failed to read (see the group's 'failures' attribute)")
        for date, f in zip(m["dates"], m["valid_fraction"]):
            lines.append(f"  {date}  valid {100 * f:6.2f} %")
    return "\n".join(lines)
