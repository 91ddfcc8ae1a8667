"""Keeping secrets out of everything skypipe stores or prints: signed hrefs are kept for reading, and only there.

Signed asset hrefs carry credentials in their query string: Azure SAS tokens (Planetary Computer,
``?st=..&se=..&sp=..&sig=..``), S3 / GCS presigned URLs (``X-Amz-Signature=..``), ``token=`` style API keys.
Reads need them; cube attributes, manifests, failure records, warnings and tracebacks do not. Two choke points:

* :func:`public_href` is the only form of an href that is stored or put into a message: secret query parameters
  (and a password in the URL) are dropped, the rest of the href is kept. :class:`pipeline.cube.reader.AssetProblem`
  and the cube plan's provenance go through it.
* :func:`install_redaction` makes every log record pass :class:`RedactingFilter` (its message, arguments and
  traceback are rewritten by :func:`redact`), whichever logger made it (rasterio logs GDAL's errors with the signed
  path at INFO) and whichever handler emits it. ``import pipeline.catalog`` installs it; entry points call it again
  after configuring logging (idempotent). It also redacts warnings and uncaught tracebacks printed to stderr.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
import warnings
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pipeline.catalog.signing import SAS_KEYS

REDACTED = "REDACTED"

# Query parameters that are credentials wherever they appear (matched case-insensitively).
SECRET_KEYS = frozenset(
    {"sig", "signature", "token", "access_token", "id_token", "refresh_token", "api_key", "apikey", "api-key",
     "password", "passwd", "secret", "client_secret", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
     "x-goog-signature", "x-goog-credential"}
)  # fmt: skip
"""Names that mark a secret even outside a query string (``sig=...`` in a message)."""

QUERY_KEYS = frozenset(k.lower() for k in SAS_KEYS) | SECRET_KEYS | {"key-pair-id", "policy"}
"""Query parameters dropped from stored hrefs and redacted in text: SAS, presigned-URL and CloudFront keys too."""

# A value ends at a separator or at trailing punctuation of the sentence around it ("...&sig=abc: not found").
_VALUE = r"[^&#\s'\"<>]*?(?=[.,:;)\]}]*(?:[&#\s'\"<>]|$))"
_IN_QUERY = re.compile(
    r"(?P<pre>[?&])(?P<key>" + "|".join(re.escape(k) for k in sorted(QUERY_KEYS, key=len, reverse=True)) + r")="
    + _VALUE,
    re.IGNORECASE,
)  # fmt: skip
_BARE = re.compile(
    r"(?P<pre>(?<![\w-]))(?P<key>" + "|".join(re.escape(k) for k in sorted(SECRET_KEYS, key=len, reverse=True))
    + r")=" + _VALUE,
    re.IGNORECASE,
)  # fmt: skip
_USERINFO = re.compile(r"(?P<pre>://[^/\s:@'\"<>]+):[^/\s@'\"<>]+@")
_BEARER = re.compile(r"\b(?P<pre>(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=-]{8,}")


def public_href(href: str) -> str:
    """``href`` as it may be stored or shown: without secret query parameters or a password; the rest kept.

    Local paths and hrefs without a query string come back unchanged.
    """
    text = str(href)
    if "?" not in text and "@" not in text:
        return text
    parts = urlsplit(text)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in pairs if k.lower() not in QUERY_KEYS]
    user, at, host = parts.netloc.rpartition("@")
    if len(query) == len(pairs) and ":" not in user:
        return text  # nothing secret: leave the href byte for byte
    netloc = f"{user.split(':', 1)[0]}{at}{host}"
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query) if len(query) < len(pairs) else parts.query))


def redact(text: str) -> str:
    """Free text (a log message, an error, a traceback) with every secret value replaced by ``REDACTED``.

    Catches SAS / presigned parameters in any query string (``?st=..&sig=..``, also inside GDAL's ``/vsicurl/``
    paths and after a bare file name), secret-named ``key=value`` pairs, URL passwords and bearer tokens.
    """
    if "=" not in text and "@" not in text and "Bearer" not in text and "Basic" not in text:
        return text
    text = _IN_QUERY.sub(lambda m: f"{m['pre']}{m['key']}={REDACTED}", text)
    text = _BARE.sub(lambda m: f"{m['pre']}{m['key']}={REDACTED}", text)
    text = _USERINFO.sub(lambda m: f"{m['pre']}:{REDACTED}@", text)
    return _BEARER.sub(lambda m: f"{m['pre']}{REDACTED}", text)


class RedactingFilter(logging.Filter):
    """Rewrites a log record in place so that no handler can emit a secret; never drops a record.

    The formatted message replaces ``msg``/``args`` when it contained a secret, and the traceback text
    (``exc_text``) and ``stack_info`` are formatted and redacted up front, so formatters use the clean text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` (see the class docstring); always keeps it."""
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let the handler report it as logging always does
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FORMATTER = logging.Formatter()
_FILTER = RedactingFilter()
_MARK = "_skypipe_redacts"


def install_redaction() -> None:
    """Redact every log record, warning and uncaught traceback of this process (idempotent; see module docstring).

    * the root logger's current handlers get :class:`RedactingFilter`;
    * the log-record factory applies it when a record is made, so handlers added later (``logging.basicConfig``
      after this call, pytest's capture) and records of every library are covered too;
    * ``warnings.formatwarning`` and the default ``sys.excepthook`` redact what they print to stderr.
    """
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(_FILTER)
    factory = logging.getLogRecordFactory()
    if not getattr(factory, _MARK, False):

        def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = factory(*args, **kwargs)
            _FILTER.filter(record)
            return record

        setattr(redacting_factory, _MARK, True)
        logging.setLogRecordFactory(redacting_factory)
    formatwarning = warnings.formatwarning
    if not getattr(formatwarning, _MARK, False):

        def redacting_formatwarning(*args: Any, **kwargs: Any) -> str:
            return redact(formatwarning(*args, **kwargs))

        setattr(redacting_formatwarning, _MARK, True)
        warnings.formatwarning = redacting_formatwarning
    if sys.excepthook is sys.__excepthook__:  # a custom hook (IPython, a debugger) is left alone
        sys.excepthook = _redacting_excepthook


def _redacting_excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))
