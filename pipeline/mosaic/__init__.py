"""Mosaic stage: Dask stitching of inference tiles, blending, COG / Zarr / GeoParquet writers, quicklooks.

Data flows ``tiles.zarr`` -> :func:`pipeline.mosaic.stitch.stitch_tiles` -> ``mosaic.zarr`` -> COG
(:func:`pipeline.mosaic.cog.write_cog`), PNG (:func:`pipeline.mosaic.quicklook.quicklook`) and embedding archives
(:func:`pipeline.mosaic.archive.build_archive`, queried by :func:`pipeline.mosaic.query.query_archive`).
Sub-modules are imported on use, so the CLI stays fast to start.
"""
