"""Signing asset hrefs for catalogs that need it (Planetary Computer SAS tokens), and re-signing expired ones.

Planetary Computer asset hrefs point at Azure Blob Storage and need a Shared Access Signature (SAS) token appended
as a query string (``?st=...&se=2026-11-22T12%3A00%3A00Z&sp=rl&sv=...&sr=c&sig=...``); ``se`` is the expiry time.
Tokens live about an hour, so a long cube build can outlive the one it started with.

How cube reads use this:

* :func:`sign_items` after a search (``pipeline.catalog.search`` does it for ``signing: planetary-computer``).
* :class:`Resigner` is the re-sign hook. ``resigner.fresh(href)`` returns the href unchanged while its token has
  more than ``margin`` left and a freshly signed one otherwise: pass it as ``odc.stac.load(..., patch_url=
  resigner.fresh)`` when loading each chunk, so every chunk starts with a valid token. ``resigner(href)`` always
  re-signs: call it after a read failed with HTTP 403 / ``AuthenticationFailed`` (what
  :func:`pipeline.catalog.assets.open_asset` does when given ``resign=``).

The signing function is a parameter (default: ``planetary_computer.sign_url``), so the expiry and retry logic is
testable offline with a local token function. Signing modes (a catalog's ``signing:``): ``none``,
``planetary-computer`` (a fresh token per href from the Planetary Computer token API) and ``sas-token`` (the SAS
token you were given for a private Azure container, read from the environment variable :data:`SAS_TOKEN_ENV` so
that it never sits in a catalog file; :func:`env_sas_sign_href`).

Signed hrefs are for reading only: what is stored or logged goes through :func:`pipeline.catalog.redact.public_href`
and the logging filter of :mod:`pipeline.catalog.redact`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pystac

log = logging.getLogger(__name__)

SignHref = Callable[[str], str]
"""A function that appends a (fresh) token to an unsigned href."""

# Query parameters that make up an Azure SAS token (service and account SAS).
SAS_KEYS = frozenset(
    {"sv", "ss", "srt", "sp", "se", "st", "spr", "sip", "sr", "sig", "si", "sdd", "skoid", "sktid", "skt", "ske",
     "sks", "skv", "saoid", "suoid", "scid", "rscc", "rscd", "rsce", "rscl", "rsct"}
)  # fmt: skip


def planetary_computer_sign_href(href: str) -> str:
    """Sign one href with the ``planetary-computer`` package (fetches a token over the network)."""
    import planetary_computer  # local: only catalogs that sign need it

    return planetary_computer.sign_url(href)


SAS_TOKEN_ENV = "SKYPIPE_SAS_TOKEN"
"""Environment variable holding the SAS token of ``signing: sas-token`` catalogs (``st=...&se=...&sig=...``)."""


def env_sas_sign_href(href: str) -> str:
    """Sign one href with the static SAS token in ``$SKYPIPE_SAS_TOKEN`` (``signing: sas-token``).

    Raises:
        ValueError: the variable is not set (the message names it, never a token).

    """
    base = strip_token(href)
    return f"{base}{'&' if urlsplit(base).query else '?'}{_env_sas_token()}"


def _env_sas_token() -> str:
    token = os.environ.get(SAS_TOKEN_ENV, "").strip().lstrip("?")
    if not token:
        raise ValueError(f"this catalog uses 'signing: sas-token' but ${SAS_TOKEN_ENV} is not set (export the token)")
    return token


def strip_token(href: str) -> str:
    """``href`` without SAS query parameters (other query parameters are kept)."""
    parts = urlsplit(href)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in SAS_KEYS]
    return urlunsplit(parts._replace(query=urlencode(query)))


def token_expiry(href: str) -> datetime | None:
    """Expiry (``se``) of the SAS token in ``href`` as an aware UTC datetime, or ``None`` when unsigned."""
    for k, v in parse_qsl(urlsplit(href).query):
        if k == "se":
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
            return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt
    return None


def is_expiring(href: str, margin: timedelta = timedelta(minutes=5), now: datetime | None = None) -> bool:
    """Whether ``href``'s token expires within ``margin`` (hrefs without a token never expire)."""
    expiry = token_expiry(href)
    if expiry is None:
        return False
    return expiry - (now or datetime.now(timezone.utc)) <= margin


def is_auth_failure(message: str) -> bool:
    """Whether an error message reads like a refused token (403, ``AuthenticationFailed``, ...).

    A last resort only: :func:`pipeline.catalog.diagnose.diagnose` decides from HTTP status codes and exception
    types, and falls back to this text check only where neither is available.
    """
    m = message.lower()
    return any(s in m for s in ("403", "authenticationfailed", "authorizationfailure", "signature", "forbidden"))


class Resigner:
    """Re-sign hook for hrefs whose token expired (see the module docstring for how reads use it).

    Args:
        sign_href: appends a fresh token to an unsigned href (default: Planetary Computer's ``sign_url``).
        margin: re-sign in :meth:`fresh` when the token has less than this left.
        clock: current UTC time (injectable for tests).

    """

    def __init__(
        self,
        sign_href: SignHref = planetary_computer_sign_href,
        margin: timedelta = timedelta(minutes=5),
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.sign_href = sign_href
        self.margin = margin
        self.clock = clock
        self.count = 0

    def __call__(self, href: str) -> str:
        """Re-sign ``href`` now: drop its old token and ask for a new one."""
        self.count += 1
        fresh = self.sign_href(strip_token(href))
        log.debug("re-signed %s (token now expires %s)", strip_token(href), token_expiry(fresh))
        return fresh

    def fresh(self, href: str) -> str:
        """``href`` if its token is still valid for ``margin``, else a re-signed href (unsigned hrefs are signed)."""
        if token_expiry(href) is None:
            return self(href)
        return self(href) if is_expiring(href, self.margin, self.clock()) else href


def make_resigner(signing: str, sign_href: SignHref | None = None) -> Resigner | None:
    """The re-sign hook for a catalog's ``signing`` mode (``None`` when hrefs need no signing)."""
    if signing == "none":
        return None
    if signing == "planetary-computer":
        return Resigner(sign_href or planetary_computer_sign_href)
    if signing == "sas-token":
        if sign_href is None:
            _env_sas_token()  # fail now, before a search, when the token is missing
        return Resigner(sign_href or env_sas_sign_href)
    raise ValueError(f"unknown signing mode {signing!r}; known: none, planetary-computer, sas-token")


def sign_items(items: Iterable[pystac.Item], sign_href: SignHref) -> list[pystac.Item]:
    """Copies of ``items`` with every asset href signed by ``sign_href``."""
    out = []
    for item in items:
        signed = item.clone()
        for asset in signed.assets.values():
            asset.href = sign_href(asset.href)
        out.append(signed)
    return out
