"""``skypipe view`` in headless Chromium (Debian's package, driven by Playwright) on loopback, on real outputs.

The target is a real Sen1Floods11 embeddings job (committed checkpoint) with its archive and a few-shot class map:
the page loads, every raster layer's tiles come back, the screenshot shows data, a click returns similar patches,
a click off the archive says so, and nothing is requested from anywhere but this server.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest_plugins = ["archive_fixtures"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def _browser_or_skip() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: `make test` installs Debian's chromium (see the Makefile)")
        pytest.skip("Debian's chromium is not installed (`make test` installs it)")
    pytest.importorskip("playwright.sync_api")
    return CHROMIUM


@pytest.fixture(scope="module")
def viewer(sen1floods11_archive, tmp_path_factory):
    import uvicorn
    from archive_fixtures import S1F_WINDOW, label_points

    from pipeline.mosaic.fewshot import classify_archive
    from pipeline.view.server import ViewerState, create_app

    _browser_or_skip()
    job = sen1floods11_archive["job"]
    labels = tmp_path_factory.mktemp("labels") / "labels.geojson"
    label_points(sen1floods11_archive["labels"], S1F_WINDOW, 8).to_file(labels)
    classify_archive(str(job / "archive"), str(labels), str(job / "fewshot"))
    state = ViewerState(str(job))
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield {"url": f"http://127.0.0.1:{port}/", "state": state}
    server.should_exit = True
    thread.join(timeout=10)
    state.close()


def test_layers_found(viewer):
    titles = [layer.title for layer in viewer["state"].layers]
    assert any(t.startswith("cube s2") for t in titles)
    assert any(t.startswith("embedding PCA") for t in titles)
    classes = [layer for layer in viewer["state"].layers if layer.title == "fewshot/classes.tif"]
    assert classes and [e["name"] for e in classes[0].legend] == ["land", "water"]
    assert "fewshot/polygons.parquet" in titles and viewer["state"].archives


def test_page_renders_layers_and_a_click_finds_similar_patches(viewer, tmp_path):
    from playwright.sync_api import sync_playwright

    url = viewer["url"]
    requests, statuses = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_browser_or_skip(), args=FLAGS)
        page = browser.new_page(viewport={"width": 1000, "height": 760})
        page.on("request", lambda r: requests.append(r.url))
        page.on("response", lambda r: statuses.append((r.url, r.status)))
        page.goto(url)
        page.wait_for_function("window.skypipe && window.skypipe.ready", timeout=60_000)
        page.wait_for_function("window.skypipe.tilesLoaded >= 4", timeout=120_000)
        page.wait_for_load_state("networkidle")
        shot = tmp_path / "view.png"
        page.screenshot(path=str(shot))
        assert page.evaluate("window.skypipe.tileErrors") == 0
        legend = page.inner_text("#legend")
        assert "land" in legend and "water" in legend
        # the map shows data: most of the map's middle is not the empty background
        rgb = np.asarray(Image.open(shot).convert("RGB"))[200:560, 300:700].astype(int)
        background = np.array([0x1D, 0x21, 0x26])
        assert (np.abs(rgb - background).sum(-1) > 30).mean() > 0.5
        # a click on the archive returns similar patches drawn on the map
        x, y = page.evaluate("""(() => { const m = window.skypipe.map;
            const p = m.latLngToContainerPoint(m.getBounds().getCenter()); return [p.x, p.y]; })()""")
        page.mouse.click(x, y)
        page.wait_for_function("window.skypipe.hits !== null", timeout=120_000)
        assert page.evaluate("window.skypipe.hits") == 50
        assert "similar patches" in page.inner_text("#hit-count")
        # a click far off the archive: a clear message, no hits
        page.evaluate("window.skypipe.hits = null; window.skypipe.map.setView([38.2, -0.6], 16)")
        page.mouse.click(500, 400)
        page.wait_for_function("window.skypipe.hits !== null", timeout=60_000)
        assert page.evaluate("window.skypipe.hits") == 0 and "has no patch" in page.inner_text("#hits")
        browser.close()
    assert requests and all(r.startswith(url) for r in requests), [r for r in requests if not r.startswith(url)]
    tiles = [s for u, s in statuses if "/cog/tiles/" in u]
    assert tiles and all(s == 200 for s in tiles)


def test_tile_server_reads_only_registered_layers(viewer):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(viewer["url"] + "cog/tiles/WebMercatorQuad/1/1/1.png?layer=/etc/passwd")
    assert err.value.code == 404
