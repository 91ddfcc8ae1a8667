"""``skypipe view``: a local web map of a job's outputs or an archive (Leaflet + TiTiler tiles, click to search).

:mod:`pipeline.view.layers` finds the layers, :mod:`pipeline.view.server` serves them on loopback.
"""
