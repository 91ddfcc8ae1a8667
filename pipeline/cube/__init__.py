"""Co-registration of STAC items onto one grid and the Zarr cube layout (``/s2``, ``/s1``, ``/hr`` groups).

The public names below are imported on first use, so ``skypipe --help`` and the job spec stay quick to import
(the readers pull in odc-stac, dask and rasterio).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_cube": "pipeline.cube.build",
    "CubeReport": "pipeline.cube.build",
    "build_from_job": "pipeline.cube.job",
    "CubeGrid": "pipeline.cube.grid",
    "HR_GSDS": "pipeline.cube.grid",
    "region_grid": "pipeline.cube.grid",
    "snap_hr_gsd": "pipeline.cube.grid",
    "utm_crs": "pipeline.cube.grid",
    "cube_info": "pipeline.cube.info",
    "format_info": "pipeline.cube.info",
    "open_modality": "pipeline.cube.layout",
    "cube_state": "pipeline.cube.layout",
    "BandNotFoundError": "pipeline.cube.plan",
    "SourceLike": "pipeline.cube.plan",
    "write_quicklooks": "pipeline.cube.quicklook",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.cube' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
