"""A cube build driven by a job spec: catalog search, then :func:`pipeline.cube.build.build_cube`."""

from __future__ import annotations

import logging
from typing import Literal

from pipeline.cube.build import CubeReport, build_cube
from pipeline.spec import JobSpec

log = logging.getLogger(__name__)


def build_from_job(
    job: JobSpec, *, overwrite: bool = False, progress: bool = True, workers: int | None = None,
    executor: Literal["threads", "ray"] = "threads",
) -> CubeReport:  # fmt: skip
    """Search the job's catalog for its region, time range and modalities, then build (or resume) its cube.

    A local catalog (no ``url``) is served on loopback for the whole build, so every read goes through HTTP range
    requests exactly as against a cloud bucket.
    """
    from pipeline.catalog import load_catalog
    from pipeline.catalog.search import catalog_api, search

    catalog = load_catalog(job.catalog)
    with catalog_api(catalog) as api_url:
        result = search(
            catalog,
            region=job.region,
            start=job.time.start,
            end=job.time.end,
            modalities=list(job.modalities),
            max_cloud=job.max_cloud,
            url=api_url,
        )
        log.info("search:\n%s", result.summary())
        return build_cube(
            job.cube.path,
            result.items,
            result.sources,
            region=job.bbox,
            crs=job.crs,
            resolutions=job.resolution,
            chunks=(job.cube.chunks.y, job.cube.chunks.x),
            overwrite=overwrite,
            workers=workers,
            progress=progress,
            patch_url=result.resigner.fresh if result.resigner is not None else None,
            executor=executor,
            attrs={
                "job": job.name,
                "catalog": catalog.name,
                "time": [str(job.time.start), str(job.time.end)],
                "max_cloud": job.max_cloud,
            },
        )
