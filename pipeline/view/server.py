"""The viewer's web server: a Leaflet page, COG tiles through TiTiler, GeoJSON layers and click-to-search.

Routes (all on the loopback interface by default)::

    /                              the page (static/index.html; Leaflet is vendored: nothing comes from a CDN)
    /static/...                    the page's scripts, styles and the vendored Leaflet
    /api/layers                    the layers (:mod:`pipeline.view.layers`) and whether clicking searches
    /api/vector/{layer}            a vector layer as GeoJSON in WGS84 (at most ``max_features`` features)
    /api/search?lon=&lat=&k=       ``skypipe archive search`` at a point: the hits as GeoJSON, best first
    /cog/tiles/WebMercatorQuad/{z}/{x}/{y}.png?layer=ID   map tiles of a raster layer (TiTiler ``TilerFactory``)

Tiles are read with rio-tiler through TiTiler's tiler factory; which file a tile request may read is looked up by
layer id (:func:`layer_path`), so the server reads only the layers it found, never a path from the request. There is
no basemap (no tile server on the internet is reachable, nor wanted): the job's own layers are the map.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from pipeline.view.layers import Layer, discover

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


class ViewerState:
    """The layers of one target, the archive searchers (opened on first use) and the cache folder."""

    def __init__(self, target: str, *, cache: str | None = None, max_size: int = 2048, max_features: int = 20000):
        self.target = target
        self._own_cache = cache is None
        self.cache = cache or tempfile.mkdtemp(prefix="skypipe-view-")
        self.layers, self.archives = discover(target, self.cache, max_size=max_size)
        self.by_id = {layer.id: layer for layer in self.layers}
        self.max_features = max_features
        self._searchers: dict[str, Any] = {}
        self._lock = threading.Lock()
        # load the indexes now, off the request path, so the first click does not wait for them
        threading.Thread(target=lambda: [self.searcher(a) for a in self.archives], daemon=True).start()

    def searcher(self, archive: str) -> Any:
        """The archive's :class:`~pipeline.mosaic.search.ArchiveSearcher` (index loaded once)."""
        with self._lock:
            if archive not in self._searchers:
                from pipeline.mosaic.search import ArchiveSearcher

                self._searchers[archive] = ArchiveSearcher(archive)
            return self._searchers[archive]

    def close(self) -> None:
        """Remove the cache folder the viewer made."""
        if self._own_cache:
            shutil.rmtree(self.cache, ignore_errors=True)


def _geojson(frame: Any, limit: int) -> dict[str, Any]:
    import json

    frame = frame.to_crs("EPSG:4326") if frame.crs is not None else frame
    frame = frame.head(limit)
    keep = [c for c in frame.columns if c == "geometry" or frame[c].dtype.kind in "biufO"]
    frame = frame[keep]
    for col in frame.columns:
        if col != "geometry" and frame[col].dtype == object:
            frame[col] = frame[col].map(lambda v: v if isinstance(v, (str, int, float, type(None))) else str(v))
    return json.loads(frame.to_json(drop_id=True))


def create_app(state: ViewerState) -> FastAPI:
    """The FastAPI application of one viewer state."""
    from titiler.core.factory import TilerFactory

    app = FastAPI(title="skypipe view", docs_url=None, redoc_url=None)

    def layer_path(layer: str = Query(..., description="layer id from /api/layers")) -> str:
        found = state.by_id.get(layer)
        if found is None or found.kind != "raster":
            raise HTTPException(404, f"no raster layer {layer!r}")
        return found.path

    tiler = TilerFactory(router_prefix="/cog", path_dependency=layer_path, add_viewer=False, add_preview=False,
                         add_part=False)  # fmt: skip
    app.include_router(tiler.router, prefix="/cog")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/layers")
    def layers() -> dict[str, Any]:
        return {"target": state.target, "layers": [layer.public() for layer in state.layers],
                "searchable": bool(state.archives)}  # fmt: skip

    @app.get("/api/vector/{layer_id}")
    def vector(layer_id: str) -> JSONResponse:
        import geopandas as gpd

        layer: Layer | None = state.by_id.get(layer_id)
        if layer is None or layer.kind != "vector":
            raise HTTPException(404, f"no vector layer {layer_id!r}")
        return JSONResponse(_geojson(gpd.read_parquet(layer.path), state.max_features))

    @app.get("/api/search")
    def search(lon: float, lat: float, k: int = 50) -> JSONResponse:
        if not state.archives:
            raise HTTPException(404, "nothing to search: the target holds no embedding archive")
        errors = []
        for archive in state.archives:
            searcher = state.searcher(archive)
            try:
                vec, query = searcher.point_query(lon, lat)
            except ValueError as err:
                errors.append(str(err))
                continue
            result = searcher.search(vec, max(1, min(k, 1000)), query=query)
            body = _geojson(result.hits, k)
            body["query"] = {**result.query, "archive": archive}
            body["seconds"] = result.seconds
            return JSONResponse(body)
        return JSONResponse({"error": " / ".join(errors)}, status_code=422)

    return app


def serve(target: str, *, host: str = "127.0.0.1", port: int = 8765, ready: threading.Event | None = None) -> None:
    """Serve the viewer of ``target`` until interrupted (``ready`` is set once it listens)."""
    import uvicorn

    state = ViewerState(target)
    try:
        server = uvicorn.Server(uvicorn.Config(create_app(state), host=host, port=port, log_level="warning"))
        if ready is not None:
            threading.Thread(target=_signal_when_started, args=(server, ready), daemon=True).start()
        server.run()
    finally:
        state.close()


def _signal_when_started(server: Any, ready: threading.Event) -> None:
    import time

    while not server.started:
        time.sleep(0.05)
    ready.set()
