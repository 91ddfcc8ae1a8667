"""Failure causes come from status codes, probes and exception types, never from searching GDAL's text.

A real range-request asset server on loopback, on a port whose number contains "404" (so a message that merely
names the server reads like "HTTP 404"), serves a real GeoTIFF, a truncated copy, a non-raster file and nothing
for a missing name; other servers answer 403 and 503.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pystac
import pytest
import rasterio
from rasterio.errors import RasterioIOError

from pipeline.catalog.assets import AssetReadError, open_asset
from pipeline.catalog.diagnose import diagnose
from pipeline.catalog.gdal import GDAL_ENV, gdal_path, href_of
from pipeline.catalog.serve import AssetServer, RangeFileHandler, free_port
from pipeline.cube.reader import AssetProblem, check_assets

pytest_plugins = ["catalog_fixtures"]

SIG = "sig=DIAGSECRET"


def _open_error(href: str) -> RasterioIOError:
    """The error GDAL gives for ``href`` (opened as every reader opens it)."""
    with pytest.raises(RasterioIOError) as info, rasterio.Env(**GDAL_ENV), rasterio.open(gdal_path(href)):
        pass
    return info.value


@contextlib.contextmanager
def _server_on_port_with_404(roots: dict[str, Path], handler=RangeFileHandler) -> Iterator[AssetServer]:
    for port in [*range(40400, 40500), *range(14040, 14050), *range(24040, 24050), 4040]:
        try:
            server = AssetServer(roots, port=port, handler_class=handler)
        except OSError:
            continue
        try:
            yield server
        finally:
            server.close()
        return
    pytest.skip("no free port containing '404' on 127.0.0.1")


@pytest.fixture
def files(tmp_path: Path, shared_data: Path) -> Path:
    """A folder with a GeoTIFF, a truncated copy (named like a tile with 404 in it), a non-raster and an empty file."""
    scene = shared_data / "eolearn_slovenia" / "reference_scenes" / "S2L1C_20150830.tif"
    shutil.copy(scene, tmp_path / "good.tif")
    (tmp_path / "T40404_trunc.tif").write_bytes(scene.read_bytes()[:120_000])  # eo-learn keeps its IFD at the end
    (tmp_path / "notes.tif").write_text("a text file with a .tif name\n")
    (tmp_path / "empty.tif").write_bytes(b"")
    (tmp_path / "folder.tif").mkdir()
    return tmp_path


def test_http_causes_come_from_status_codes_not_from_the_port(files: Path):
    with _server_on_port_with_404({"a": files}) as server:
        assert "404" in str(server.port)
        base = f"{server.url}/a"
        missing = diagnose(f"{base}/missing.tif?{SIG}", _open_error(f"{base}/missing.tif?{SIG}"))
        assert (missing.kind, missing.status, missing.cause) == ("missing", 404, "not found (HTTP 404)")

        # GDAL's messages name the server or the file: both contain "404", neither is a 404.
        err = _open_error(f"{base}/notes.tif?{SIG}")
        assert "404" in str(err)
        notes = diagnose(f"{base}/notes.tif?{SIG}", err)
        assert notes.kind == "corrupt" and "not a readable raster" in notes.cause and notes.status is None
        err = _open_error(f"{base}/T40404_trunc.tif?{SIG}")
        assert "404" in str(err)
        trunc = diagnose(f"{base}/T40404_trunc.tif?{SIG}", err)
        assert trunc.kind == "corrupt" and "truncated or corrupt" in trunc.describe()
        assert "TIFF" in trunc.detail  # GDAL's own words are kept as the detail ...
        for d in (missing, notes, trunc):  # ... without the token
            assert "DIAGSECRET" not in f"{d.cause} {d.hint} {d.detail} {d.describe()}"

        empty = diagnose(f"{base}/empty.tif", _open_error(f"{base}/empty.tif"))
        assert empty.kind == "corrupt" and "empty" in empty.cause


class RefusingHandler(RangeFileHandler):
    """Answers every request with the status in the first path segment (``/403/...``, ``/503/...``)."""

    def send_head(self):
        self.send_error(int(self.path.strip("/").split("/", 1)[0]), "refused")
        return None


def test_refused_and_unavailable_and_unreachable(files: Path):
    server = AssetServer({}, handler_class=RefusingHandler)
    try:
        denied = diagnose(f"{server.url}/403/good.tif?{SIG}", RasterioIOError("HTTP response code: 403"))
        assert (denied.kind, denied.status) == ("denied", 403) and "access refused (HTTP 403)" in denied.cause
        down = diagnose(f"{server.url}/503/good.tif", RasterioIOError("anything"))
        assert (down.kind, down.status) == ("unavailable", 503)
        # The message says 403, the server says 404: the status wins.
        gone = diagnose(f"{server.url}/404/good.tif", RasterioIOError("HTTP response code: 403"))
        assert gone.kind == "missing"
    finally:
        server.close()
    nobody = diagnose(f"http://127.0.0.1:{free_port()}/a.tif", RasterioIOError("HTTP response code: 404"))
    assert nobody.kind == "unreachable" and "ConnectionRefusedError" in nobody.cause


def test_local_files(files: Path):
    assert diagnose(str(files / "missing.tif"), _open_error(str(files / "missing.tif"))).kind == "missing"
    assert diagnose(f"file://{files / 'missing.tif'}").cause == "not found (no such file)"
    assert diagnose(str(files / "folder.tif")).kind == "missing"
    assert diagnose(str(files / "T40404_trunc.tif"), _open_error(str(files / "T40404_trunc.tif"))).kind == "corrupt"
    assert diagnose(str(files / "notes.tif"), _open_error(str(files / "notes.tif"))).kind == "corrupt"
    assert diagnose(str(files / "empty.tif")).cause == "empty file (0 bytes)"
    if os.geteuid() != 0:  # root reads anything
        locked = files / "locked.tif"
        shutil.copy(files / "good.tif", locked)
        locked.chmod(0)
        assert diagnose(str(locked)).kind == "denied"


def test_fsspec_urls_are_probed_for_existence():
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.pipe("/diag-bucket/there.tif", b"not a tiff")
    try:
        assert diagnose("memory://diag-bucket/gone.tif", RasterioIOError("x")).cause == "not found (no such object)"
        assert diagnose("memory://diag-bucket/there.tif", RasterioIOError("x")).kind == "corrupt"
    finally:
        fs.rm("/diag-bucket", recursive=True)


def test_without_a_probe_the_exception_type_decides():
    # A GDAL path of its own cannot be probed: Python's and GDAL's exception types decide ...
    assert diagnose("/vsimem/x.tif", FileNotFoundError("x")).kind == "missing"
    assert diagnose("/vsimem/x.tif", PermissionError("x")).kind == "denied"
    assert diagnose("/vsimem/x.tif", TimeoutError("x")).kind == "unavailable"
    try:
        raise RasterioIOError("opaque")
    except RasterioIOError as outer:
        try:
            from rasterio._err import CPLE_AWSObjectNotFoundError

            raise RasterioIOError("still opaque") from CPLE_AWSObjectNotFoundError(13, 13, "gone")
        except RasterioIOError as chained:
            assert diagnose("/vsimem/x.tif", chained).kind == "missing"
        assert diagnose("/vsimem/x.tif", outer).kind == "unknown"
    # ... and only then the text, for refused tokens.
    assert diagnose("/vsimem/x.tif", RasterioIOError("AuthenticationFailed")).kind == "denied"


def test_gdal_path_round_trip():
    for href, path in [
        ("https://h/a.tif?sig=x", "/vsicurl/https://h/a.tif?sig=x"),
        ("s3://bucket/a.tif", "/vsis3/bucket/a.tif"),
        ("gs://bucket/a.tif", "/vsigs/bucket/a.tif"),
        ("file:///tmp/a.tif", "/tmp/a.tif"),
        ("/tmp/a.tif", "/tmp/a.tif"),
    ]:
        assert gdal_path(href) == path
        assert href_of(path) == href.removeprefix("file://")


def _item(item_id: str, href: str) -> pystac.Item:
    from datetime import datetime, timezone

    item = pystac.Item(item_id, None, [0, 0, 1, 1], datetime(2015, 8, 30, tzinfo=timezone.utc), {})
    item.add_asset("toa", pystac.Asset(href))
    return item


def test_check_assets_names_causes_and_stores_no_token(files: Path):
    with _server_on_port_with_404({"a": files}) as server:
        base = f"{server.url}/a"
        names = {"ok": "good.tif", "gone": "missing.tif", "trunc": "T40404_trunc.tif", "text": "notes.tif"}
        items = [_item(i, f"{base}/{n}?keep=1&{SIG}") for i, n in names.items()]
        problems, crs = check_assets(items, ["toa.2"])
    assert set(crs) == {"ok"} and crs["ok"] == "EPSG:32633"
    by_item = {p.item: p for p in problems}
    assert set(by_item) == {"gone", "trunc", "text"}
    assert by_item["gone"].error == "not found (HTTP 404)"
    assert "truncated or corrupt" in by_item["trunc"].error and "truncated or corrupt" in by_item["text"].error
    for p in problems:
        assert p.href.endswith("?keep=1") and "this item is skipped" in p.hint
        assert "DIAGSECRET" not in repr(vars(p)) + p.message()


def test_asset_problem_strips_tokens_whatever_it_is_given():
    p = AssetProblem("i", "a", "https://h/a.tif?se=2026&sig=LEAK", "cannot read /vsicurl/https://h/a.tif?sig=LEAK", "x")
    assert p.href == "https://h/a.tif" and "LEAK" not in p.message()


def test_open_asset_messages(files: Path):
    with _server_on_port_with_404({"a": files}) as server:
        href = f"{server.url}/a/T40404_trunc.tif?{SIG}"
        with pytest.raises(AssetReadError, match=r"T40404_trunc\.tif: not a readable raster") as info, open_asset(href):
            pass
        assert info.value.diagnosis.kind == "corrupt" and "DIAGSECRET" not in str(info.value)
        assert info.value.__cause__ is None and info.value.__suppress_context__  # GDAL's text holds the token
        with open_asset(f"{server.url}/a/good.tif?{SIG}") as ds:
            assert ds.count == 13
