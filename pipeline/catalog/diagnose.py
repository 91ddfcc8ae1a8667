"""Why an asset cannot be read, decided from facts: the exception's type and a probe of the href, never GDAL's text.

GDAL's messages are free text that carry the href: ``"404" in message`` also matches a server on port 40453 or a
tile named ``T40404``. :func:`diagnose` decides instead, in this order:

1. a probe of the href (the one used for reading, signed where the catalog signs):

   * a local path (or ``file://``): ``os.stat`` / ``os.access`` (missing, a folder, not readable, empty);
   * ``http(s)://``: the status code of a one-byte ranged GET (``Range: bytes=0-0``, as GDAL's ``/vsicurl/`` reads;
     presigned GET URLs refuse HEAD): 404 / 410 missing, 401 / 403 refused, 429 / 5xx unavailable; no answer at all:
     unreachable;
   * ``s3://`` and other fsspec URLs: an existence check (:func:`pipeline.storage.exists`; a ``PermissionError`` is a
     refusal);

   and when the probe finds the file there and readable, the bytes are the problem: not a raster, or truncated or
   corrupt (unless the exception itself was a timeout or a dropped connection: then it was the transfer);
2. only where no probe is possible (a ``/vsi...`` path GDAL built itself, an unknown scheme, a probe that failed for
   another reason): the exception's type: Python's ``FileNotFoundError`` / ``PermissionError`` / ``TimeoutError`` /
   ``ConnectionError`` and GDAL's error classes (``CPLE_AWSObjectNotFoundError``, ``CPLE_AWSAccessDeniedError``, ...),
   found on the exception or the GDAL error it was raised from;
3. last, where there is neither a status nor a telling type:
   :func:`pipeline.catalog.signing.is_auth_failure`'s text check for refused tokens.

The result never contains the href or a token (its ``detail`` is :func:`~pipeline.catalog.redact.redact`-ed), so
it can be stored and logged as it is.
"""

from __future__ import annotations

import os
import stat
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from pipeline import storage
from pipeline.catalog.gdal import gdal_path, href_of
from pipeline.catalog.redact import redact
from pipeline.catalog.signing import is_auth_failure

try:  # GDAL's error classes as rasterio raises them (the cause or context of a RasterioIOError)
    from rasterio._err import (
        CPLE_AWSAccessDeniedError,
        CPLE_AWSBucketNotFoundError,
        CPLE_AWSInvalidCredentialsError,
        CPLE_AWSObjectNotFoundError,
        CPLE_AWSSignatureDoesNotMatchError,
    )

    _GDAL_MISSING: tuple[type[BaseException], ...] = (CPLE_AWSObjectNotFoundError, CPLE_AWSBucketNotFoundError)
    _GDAL_DENIED: tuple[type[BaseException], ...] = (
        CPLE_AWSAccessDeniedError,
        CPLE_AWSInvalidCredentialsError,
        CPLE_AWSSignatureDoesNotMatchError,
    )
except ImportError:  # pragma: no cover - a rasterio without these classes: types decide less, probes still do
    _GDAL_MISSING = _GDAL_DENIED = ()

Kind = Literal["missing", "denied", "corrupt", "unreachable", "unavailable", "unknown"]

_HINTS: dict[str, str] = {
    "missing": "the catalog points at an asset that is not there: re-index the catalog or fix the href",
    "denied": "the href is unsigned or its token expired or is invalid: check the catalog's signing and credentials",
    "corrupt": "the file is there but GDAL cannot decode it: re-download or re-export it",
    "unreachable": "check the host name and that the server or bucket is up",
    "unavailable": "probably transient: run the command again (builds resume where they stopped)",
    "unknown": "check the file and its catalog entry",
}


@dataclass(frozen=True)
class Diagnosis:
    """Why an asset could not be read.

    Attributes:
        kind: ``missing``, ``denied``, ``corrupt``, ``unreachable``, ``unavailable`` or ``unknown``.
        cause: short statement of the cause, e.g. ``not found (HTTP 404)``.
        hint: what to do about it.
        status: the HTTP status the probe got, if any.
        detail: the exception's own first line, redacted (GDAL's words for a corrupt file).

    """

    kind: Kind
    cause: str
    hint: str
    status: int | None = None
    detail: str = ""

    def describe(self) -> str:
        """The cause, with GDAL's own words where they add something (a corrupt or unexplained failure)."""
        if self.detail and self.kind in ("corrupt", "unknown") and self.detail != self.cause:
            return f"{self.cause} ({self.detail})"
        return self.cause


THERE: Literal["there"] = "there"
"""What a probe returns when the file is there and readable (``None``: the probe could not tell)."""

Probe = Diagnosis | Literal["there"] | None


def _found(kind: Kind, cause: str, status: int | None = None) -> Diagnosis:
    return Diagnosis(kind, cause, _HINTS[kind], status)


def _probe_local(path: str) -> Probe:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _found("missing", "not found (no such file)")
    except PermissionError:
        return _found("denied", "not readable (permission denied on its folder)")
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return _found("missing", "not found (a folder, not a file)")
    if not os.access(path, os.R_OK):
        return _found("denied", "not readable (permission denied)")
    if st.st_size == 0:
        return _found("corrupt", "empty file (0 bytes)")
    return THERE


def http_status(url: str, timeout: float = 10.0) -> int:
    """Status code of a one-byte ranged GET of ``url`` (the body is not read).

    Raises:
        urllib.error.URLError: no HTTP answer (refused connection, unknown host).
        TimeoutError: no answer within ``timeout`` seconds.

    """
    request = urllib.request.Request(url, headers={"Range": "bytes=0-0", "User-Agent": "skypipe-diagnose"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        err.close()
        return int(err.code)


def _probe_http(url: str, timeout: float) -> Probe:
    try:
        status = http_status(url, timeout)
    except TimeoutError:
        return _found("unavailable", f"no answer within {timeout:g} s")
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, TimeoutError):
            return _found("unavailable", f"no answer within {timeout:g} s")
        name = type(reason).__name__ if isinstance(reason, BaseException) else "no HTTP answer"
        return _found("unreachable", f"server unreachable ({name})")
    except (ValueError, OSError):
        return None
    if status in (404, 410):
        return _found("missing", f"not found (HTTP {status})", status)
    if status in (401, 403):
        return _found("denied", f"access refused (HTTP {status})", status)
    if status == 416:  # not even byte 0: the file is empty
        return _found("corrupt", f"empty file (HTTP {status})", status)
    if status == 429 or status >= 500:
        return _found("unavailable", f"server error (HTTP {status})", status)
    if status >= 400:
        return _found("unknown", f"request refused (HTTP {status})", status)
    return THERE  # 2xx (redirects were followed)


def _probe_fsspec(url: str) -> Probe:
    try:
        there = storage.exists(url)
    except PermissionError:
        return _found("denied", "access refused (permission denied by the object store)")
    except Exception:  # no fsspec backend for the scheme, no credentials, ...: the exception's type decides
        return None
    return THERE if there else _found("missing", "not found (no such object)")


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (rasterio raises its errors while handling GDAL's)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 8:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _by_type(chain: list[BaseException]) -> Diagnosis | None:
    for exc in chain:
        if isinstance(exc, (FileNotFoundError, *_GDAL_MISSING)):
            return _found("missing", "not found")
        if isinstance(exc, (PermissionError, *_GDAL_DENIED)):
            return _found("denied", "access refused")
        if isinstance(exc, TimeoutError):
            return _found("unavailable", "timed out")
        if isinstance(exc, ConnectionError):
            return _found("unreachable", f"connection failed ({type(exc).__name__})")
    return None


def _first_line(exc: BaseException | None, href: str) -> str:
    """The exception's first line, with the href (GDAL repeats it, token included) said as "the file"."""
    if exc is None:
        return ""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = " ".join(text.splitlines()[0].split())
    for name in (gdal_path(href), href, href.rsplit("/", 1)[-1]):  # longest first; GDAL also uses the bare name
        line = line.replace(name, "the file") if len(name) > 4 else line
    return redact(line)


def diagnose(href: str, exc: BaseException | None = None, *, timeout: float = 10.0) -> Diagnosis:
    """Why ``href`` could not be opened or read (see the module docstring for the rules and their order).

    Args:
        href: the href (or GDAL path) that was read, signed where the catalog signs: the probe must be allowed
            what the read was allowed.
        exc: the exception the open or read raised, if any.
        timeout: seconds to wait for an HTTP probe.

    Returns:
        A :class:`Diagnosis`; its text never contains ``href``'s token.

    """
    href = href_of(str(href))
    detail = _first_line(exc, href)
    chain = _chain(exc)
    scheme = urlsplit(href).scheme.lower() if "://" in href else ""
    probe: Probe = None
    if href.startswith("/vsi"):
        pass  # a GDAL path of its own (/vsizip/, /vsimem/, ...): nothing to probe
    elif scheme in ("", "file"):
        probe = _probe_local(href.removeprefix("file://"))
    elif scheme in ("http", "https"):
        probe = _probe_http(href, timeout)
    else:
        probe = _probe_fsspec(href)
    if isinstance(probe, Diagnosis):
        return _with_detail(probe, detail)
    if probe == THERE:  # there and readable: the transfer or the bytes are the problem
        transfer = _by_type(chain)
        if transfer is not None and transfer.kind in ("unavailable", "unreachable"):
            return _with_detail(transfer, detail)
        return _with_detail(_found("corrupt", "not a readable raster, or truncated or corrupt"), detail)
    found = _by_type(chain)
    if found is None and exc is not None and is_auth_failure(str(exc)):  # last resort: no status, no telling type
        found = _found("denied", "access refused (the error reads like a refused token)")
    if found is None:
        found = Diagnosis("unknown", detail or "unreadable", _HINTS["unknown"])
    return _with_detail(found, detail)


def _with_detail(d: Diagnosis, detail: str) -> Diagnosis:
    return Diagnosis(d.kind, d.cause, d.hint, d.status, detail)
