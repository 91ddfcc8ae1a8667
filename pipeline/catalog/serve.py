"""Serve a static catalog as a real STAC API on loopback, with its assets behind an HTTP range-request server.

:class:`LocalStacServer` starts two things, both bound to 127.0.0.1 on free ports:

* an asset server (:class:`RangeFileHandler` on a ``ThreadingHTTPServer``, HTTP/1.1 keep-alive, single
  ``bytes=a-b`` / ``a-`` / suffix ``-n`` ranges, no directory listings) serving each collection's files under
  ``/<collection id>/<path below the collection's common folder>``;
* ``rustac serve`` (memory backend) over copies of the collections whose asset hrefs are rewritten to that
  server, so every pixel read goes through GDAL ``/vsicurl/`` exactly as against a cloud bucket.

rustac implements bbox / datetime / collections / intersects / paging but not the ``query`` or ``filter``
extensions: filter cloud cover client-side against it (``pipeline.catalog.search`` does).

Nothing outlives the process that started the server, even when it is SIGKILLed: the asset server is a thread of
that process, and on Linux rustac is started with ``PR_SET_PDEATHSIG`` (it gets SIGTERM when its parent dies).
The kernel ties that signal to the *thread* that started rustac: start the server from a thread that lives as long
as the server does (the main thread, normally). The temporary folder a killed process leaves behind is removed by
the next server started on the same machine.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from pipeline.catalog.index import read_static_catalog
from pipeline.lease import node_tag, process_alive

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_TMP_PREFIX = "skypipe-stac-"
_TMP_DIR = re.compile(rf"^{_TMP_PREFIX}(?P<pid>\d+)-(?P<node>[0-9a-f]{{8}})-[^-]+$")


class RangeFileHandler(SimpleHTTPRequestHandler):
    """Static files with HTTP ``Range`` support, served from a fixed ``prefix -> folder`` map (set by the server)."""

    protocol_version = "HTTP/1.1"
    roots: dict[str, Path] = {}  # noqa: RUF012 - replaced per server by a subclass
    requests: list[tuple[str, str, str | None]] = []  # noqa: RUF012 - (method, path, Range header), per server

    def log_message(self, format: str, *args: Any) -> None:
        """Log requests at debug level instead of printing them to stderr."""
        log.debug("assets %s - %s", self.address_string(), format % args)

    def list_directory(self, path: str | os.PathLike[str]) -> None:  # type: ignore[override]
        """No directory listings: a bucket does not list either."""
        self.send_error(HTTPStatus.NOT_FOUND, "directory listing disabled")
        return None

    def translate_path(self, path: str) -> str:
        """Map ``/<prefix>/<rel>`` to a file below that prefix's folder; anything else to a non-existent path."""
        parts = unquote(urlsplit(path).path).lstrip("/").split("/", 1)
        root = self.roots.get(parts[0])
        if root is None or len(parts) < 2:
            return "/nonexistent"
        target = (root / parts[1]).resolve()
        return str(target) if target.is_relative_to(root) else "/nonexistent"

    def send_head(self) -> Any:
        """Answer ``Range`` requests with 206 / 416; everything else as a plain static file server."""
        header = self.headers.get("Range")
        self.requests.append((self.command, self.path, header))
        if not header:
            return super().send_head()
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        size = os.path.getsize(path)
        rng = _parse_range(header, size)
        if rng is None:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        start, end = rng
        f = open(path, "rb")  # noqa: SIM115 - closed by the base class after copyfile
        f.seek(start)
        self._remaining = end - start + 1
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(self._remaining))
        self.end_headers()
        return f

    def end_headers(self) -> None:
        """Advertise range support on every response, as object stores do."""
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def copyfile(self, source: Any, outputfile: Any) -> None:
        """Copy only the requested range (the whole file without a ``Range`` header)."""
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        while remaining > 0:
            buf = source.read(min(256 * 1024, remaining))
            if not buf:
                break
            outputfile.write(buf)
            remaining -= len(buf)
        self._remaining = None


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> inclusive ``(start, end)``; ``None`` if unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            return (max(size - n, 0), size - 1) if n > 0 and size > 0 else None
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class AssetServer:
    """A threaded range-request file server on loopback for ``prefix -> folder`` roots."""

    def __init__(
        self, roots: dict[str, Path], port: int = 0, handler_class: type[RangeFileHandler] = RangeFileHandler
    ) -> None:
        handler = type(
            "Handler", (handler_class,), {"roots": {k: Path(v).resolve() for k, v in roots.items()}, "requests": []}
        )
        self.httpd = ThreadingHTTPServer((HOST, port), handler)
        self.httpd.daemon_threads = True
        self.requests: list[tuple[str, str, str | None]] = handler.requests
        """Every request seen: ``(method, path, Range header)`` (tests check that reads are ranged)."""
        self.port = self.httpd.server_address[1]
        self.url = f"http://{HOST}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="asset-server", daemon=True)
        self._thread.start()

    def add_roots(self, roots: dict[str, Path]) -> None:
        """Serve more ``prefix -> folder`` roots."""
        self.httpd.RequestHandlerClass.roots.update({k: Path(v).resolve() for k, v in roots.items()})  # type: ignore[attr-defined]

    def close(self) -> None:
        """Stop serving and release the port."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rustac_executable() -> str:
    """Path of the ``rustac`` CLI (next to the running Python first, then on ``PATH``)."""
    here = Path(sys.executable).parent / "rustac"
    found = str(here) if here.exists() else shutil.which("rustac")
    if not found:
        raise FileNotFoundError("the `rustac` CLI was not found; install it with `pip install rustac`")
    return found


def rewrite_hrefs(
    catalog: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]], assets_url: str
) -> tuple[dict[str, tuple[dict[str, Any], list[dict[str, Any]]]], dict[str, Path]]:
    """Point every local asset href at ``assets_url/<collection>/<rel>``; returns the new catalog and the roots."""
    out, roots = {}, {}
    for cid, (collection, items) in catalog.items():
        local = [a["href"] for it in items for a in it["assets"].values() if "://" not in a["href"]]
        root = Path(os.path.commonpath([str(Path(h).parent) for h in local])) if local else None
        new_items = []
        for it in items:
            it = json.loads(json.dumps(it))
            for a in it["assets"].values():
                if "://" not in a["href"] and root is not None:
                    rel = Path(a["href"]).relative_to(root).as_posix()
                    a["href"] = f"{assets_url}/{quote(cid)}/{quote(rel)}"
            new_items.append(it)
        out[cid] = (collection, new_items)
        if root is not None:
            roots[cid] = root
    return out, roots


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child get SIGTERM when its parent dies (Linux ``prctl``); ``None`` elsewhere.

    The ``prctl`` function is looked up here, in the parent: the child between ``fork`` and ``exec`` only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


def remove_stale_tmp_dirs(tmp_root: str | None = None) -> list[str]:
    """Delete the temporary folders of servers whose process on this machine is gone; returns their paths."""
    root = tmp_root or tempfile.gettempdir()
    removed = []
    for entry in os.scandir(root):
        match = _TMP_DIR.match(entry.name)
        if match and match["node"] == node_tag() and not process_alive(int(match["pid"])):
            shutil.rmtree(entry.path, ignore_errors=True)  # another user's folder stays: not ours to remove
            if not os.path.exists(entry.path):
                removed.append(entry.path)
    return removed


class LocalStacServer:
    """A static catalog directory served as a STAC API (rustac) + range-request asset server, both on loopback.

    Example::

        with LocalStacServer("build/catalogs/local") as srv:
            client = pystac_client.Client.open(srv.url)

    Args:
        catalog_dir: folder with ``<collection>/collection.json`` + ``items.ndjson`` (from ``skypipe catalog
            index`` / ``build-local``).
        port: STAC API port (0: a free one).
        assets_port: asset server port (0: a free one).
        timeout: seconds to wait for rustac to answer before failing.

    Attributes:
        url: STAC API root, ``http://127.0.0.1:PORT``.
        assets_url: asset server root; asset hrefs in served items start with it.
        collections: ids of the served collections.
        asset_server: the running :class:`AssetServer` (its ``requests`` log shows the ranged reads).

    """

    def __init__(self, catalog_dir: str | os.PathLike[str], port: int = 0, assets_port: int = 0, timeout: float = 20):
        self.catalog_dir = Path(catalog_dir)
        self.port, self.assets_port, self.timeout = port, assets_port, timeout
        self.url = ""
        self.assets_url = ""
        self.collections: list[str] = []
        self.asset_server: AssetServer | None = None
        self._roots: dict[str, Path] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> LocalStacServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the asset server, write the rewritten collections, start rustac and wait until it answers."""
        catalog = read_static_catalog(self.catalog_dir)
        # Bind the asset server first (its port goes into the hrefs), then give it the roots.
        self.asset_server = AssetServer({}, self.assets_port)
        self.assets_url = self.asset_server.url
        served, roots = rewrite_hrefs(catalog, self.assets_url)
        self._roots = roots
        self.asset_server.add_roots(roots)
        remove_stale_tmp_dirs()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{_TMP_PREFIX}{os.getpid()}-{node_tag()}-")
        hrefs = []
        for cid, (collection, items) in served.items():
            cdir = Path(self._tmp.name) / cid
            cdir.mkdir()
            (cdir / "collection.json").write_text(json.dumps({**collection, "links": []}))
            (cdir / "items.ndjson").write_text("".join(json.dumps(it) + "\n" for it in items))
            hrefs += [str(cdir / "collection.json"), str(cdir / "items.ndjson")]
        self.collections = list(served)
        self._start_rustac(hrefs)

    @property
    def pid(self) -> int | None:
        """Process id of ``rustac serve`` while it runs."""
        return self._proc.pid if self._proc is not None else None

    def local_href(self, href: str) -> str:
        """The local file behind a served asset href (other hrefs unchanged)."""
        prefix = self.assets_url + "/"
        if not self.assets_url or not href.startswith(prefix):
            return href
        cid, _, rel = href.removeprefix(prefix).partition("/")
        root = self._roots.get(unquote(cid))
        return str(root / unquote(rel)) if root is not None else href

    def _start_rustac(self, hrefs: list[str]) -> None:
        # A free port can be taken between choosing it and rustac binding it: retry with another one.
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            try:
                self._run_rustac(hrefs, self.port or free_port())
                return
            except RuntimeError as err:
                if attempt + 1 == attempts or "Address already in use" not in str(err):
                    raise

    def _run_rustac(self, hrefs: list[str], port: int) -> None:
        self.url = f"http://{HOST}:{port}"
        assert self._tmp is not None
        log_path = Path(self._tmp.name) / "rustac.log"
        with open(log_path, "wb") as logf:
            self._proc = subprocess.Popen(
                [rustac_executable(), "serve", "--addr", f"{HOST}:{port}", *hrefs],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),  # only prctl + getppid run between fork and exec
            )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"rustac serve exited with code {self._proc.returncode} before answering on {self.url}:\n"
                    + log_path.read_text(errors="replace")[-2000:]
                )
            if self._ready():
                log.info("STAC API %s (assets %s), collections %s", self.url, self.assets_url, self.collections)
                return
            time.sleep(0.05)
        raise TimeoutError(
            f"rustac serve did not answer on {self.url} within {self.timeout:.0f} s:\n"
            + log_path.read_text(errors="replace")[-2000:]
        )

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/collections", timeout=2) as r:
                ids = {c["id"] for c in json.load(r).get("collections", [])}
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError, OSError):
            return False
        return set(self.collections) <= ids

    def close(self) -> None:
        """Stop rustac and the asset server and remove the temporary files (safe to call twice)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
        if self.asset_server is not None:
            self.asset_server.close()
            self.asset_server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
