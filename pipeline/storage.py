"""Paths and URLs of every on-disk contract: joins, existence checks, atomic JSON/byte writes, Zarr store paths.

Every stage stores its outputs under a local folder or an fsspec URL (``s3://...``, ``memory://...``); the helpers
here are the one place that knows the difference:

* :func:`join` / :func:`parent` build URLs the same way for both (``/`` separators; fsspec accepts them locally);
* :func:`write_json` / :func:`write_bytes` are atomic: on a local disk a temporary file in the same folder is
  written, fsynced and renamed over the target (and the folder fsynced), so a reader or a killed writer never sees
  half a file; on an object store a single PUT is atomic by itself;
* :func:`store_path` is what Zarr and xarray want (``file://`` URLs as plain paths: fsspec's local file system does
  not create parent folders on write).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

_MISSING = object()


def join(url: str, *parts: str) -> str:
    """``url/part/...`` for local paths and fsspec URLs alike."""
    return "/".join([str(url).rstrip("/"), *(p.strip("/") for p in parts)])


def parent(url: str) -> str:
    """The folder that holds ``url``."""
    head, _, _ = str(url).rstrip("/").rpartition("/")
    return head or "."


def is_local(url: str) -> bool:
    """Whether ``url`` is on the local file system (a plain path or ``file://``)."""
    return isinstance(fsspec.core.url_to_fs(str(url))[0], LocalFileSystem)


def absolute(url: str) -> str:
    """Local paths made absolute (Ray workers do not share the driver's working directory); URLs unchanged."""
    return url if "://" in str(url) else os.path.abspath(url)


def store_path(url: str) -> str:
    """``url`` as Zarr wants it: ``file://`` URLs become plain paths, other fsspec URLs pass through unchanged."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return path if isinstance(fs, LocalFileSystem) else str(url)


def exists(url: str) -> bool:
    """Whether anything (file or folder) is stored at ``url``."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return bool(fs.exists(path))


def remove(url: str) -> None:
    """Delete ``url`` (recursively for a folder); nothing there is not an error."""
    fs, path = fsspec.core.url_to_fs(str(url))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def read_bytes(url: str) -> bytes:
    """The bytes stored at ``url`` (``FileNotFoundError`` when absent)."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes, *, fsync: bool = True) -> None:
    """Store ``data`` at ``url`` atomically (see the module docstring); parent folders are created."""
    fs, path = fsspec.core.url_to_fs(str(url))
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)  # one PUT: atomic on object stores
        return
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if fsync:  # the rename itself survives a power cut only once the folder entry is on disk
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(url: str, obj: Any, *, fsync: bool = True, indent: int | None = None) -> None:
    """Store ``obj`` as JSON at ``url`` atomically (values JSON cannot hold are written with ``str``)."""
    write_bytes(url, json.dumps(obj, sort_keys=True, default=str, indent=indent).encode(), fsync=fsync)


def read_json(url: str, default: Any = _MISSING) -> Any:
    """The JSON object stored at ``url``; ``default`` when there is none (else ``FileNotFoundError``)."""
    try:
        return json.loads(read_bytes(url))
    except FileNotFoundError:
        if default is _MISSING:
            raise
        return default


def is_temporary(name: str) -> bool:
    """Whether a file name is a temporary file of :func:`write_bytes` (left behind by a killed writer)."""
    return ".tmp-" in name
