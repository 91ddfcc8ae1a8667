"""Signing and re-signing without the network: a local token function and a loopback server that checks tokens."""

from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pystac
import pytest
import rasterio

from pipeline.catalog.assets import AssetReadError, open_asset
from pipeline.catalog.serve import AssetServer, RangeFileHandler
from pipeline.catalog.signing import (
    Resigner,
    is_auth_failure,
    is_expiring,
    make_resigner,
    sign_items,
    strip_token,
    token_expiry,
)

pytest_plugins = ["catalog_fixtures"]

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
BLOB = "https://acct.blob.core.windows.net/sentinel2-l2/T31/B04.tif"


class FakeTokens:
    """Issues SAS-like tokens valid for ``ttl`` from the (fake or real) clock; counts how many it issued."""

    def __init__(self, clock, ttl=timedelta(hours=1)):
        self.clock, self.ttl, self.issued = clock, ttl, 0

    def __call__(self, href):
        assert "sig=" not in href, "must be given an unsigned href"
        self.issued += 1
        se = (self.clock() + self.ttl).strftime("%Y-%m-%dT%H:%M:%SZ")
        sep = "&" if "?" in href else "?"
        return f"{href}{sep}st=2026-11-22T00%3A00%3A00Z&se={se}&sp=rl&sv=2024-05-04&sr=c&sig=ok{self.issued}"


def test_token_parsing_and_stripping():
    signed = FakeTokens(lambda: T0)(BLOB + "?keep=1")
    assert token_expiry(signed) == T0 + timedelta(hours=1)
    assert token_expiry(BLOB) is None
    assert strip_token(signed) == BLOB + "?keep=1"
    assert not is_expiring(signed, timedelta(minutes=5), now=T0)
    assert is_expiring(signed, timedelta(minutes=5), now=T0 + timedelta(minutes=56))
    assert not is_expiring(BLOB, now=T0)


def test_resigner_fresh_only_resigns_when_expiring():
    now = [T0]
    tokens = FakeTokens(lambda: now[0])
    resign = Resigner(tokens, margin=timedelta(minutes=5), clock=lambda: now[0])
    first = resign.fresh(BLOB)  # unsigned -> signed
    assert tokens.issued == 1 and token_expiry(first) == T0 + timedelta(hours=1)
    assert resign.fresh(first) == first  # still valid: untouched
    now[0] = T0 + timedelta(minutes=58)
    second = resign.fresh(first)
    assert tokens.issued == 2 and second != first
    assert token_expiry(second) == now[0] + timedelta(hours=1)
    assert parse_qs(urlsplit(second).query)["sig"] == ["ok2"]  # old token dropped, not appended twice


def test_make_resigner_modes():
    assert make_resigner("none") is None
    assert isinstance(make_resigner("planetary-computer", FakeTokens(lambda: T0)), Resigner)
    with pytest.raises(ValueError, match="unknown signing mode"):
        make_resigner("magic")


def test_sign_items_copies():
    item = pystac.Item("x", None, [0, 0, 1, 1], T0, {})
    item.add_asset("B04", pystac.Asset(BLOB))
    (signed,) = sign_items([item], FakeTokens(lambda: T0))
    assert "sig=ok1" in signed.assets["B04"].href and item.assets["B04"].href == BLOB


def test_auth_failure_detection():
    assert is_auth_failure("HTTP response code: 403")
    assert is_auth_failure("AuthenticationFailed: Signature not valid")
    assert not is_auth_failure("HTTP response code: 404")


class TokenCheckingHandler(RangeFileHandler):
    """Refuses (403) requests whose SAS token is missing or expired, like Azure Blob Storage."""

    def send_head(self):
        se = parse_qs(urlsplit(self.path).query).get("se")
        if not se or datetime.fromisoformat(se[0].replace("Z", "+00:00")) <= datetime.now(timezone.utc):
            self.send_error(403, "AuthenticationFailed")
            return None
        return super().send_head()


def test_open_asset_resigns_after_403(tmp_path, shared_data):
    root = shared_data
    src = root / "sen1floods11" / "S1Hand" / "Spain_7370579_S1Hand.tif"
    server = AssetServer({"s1": src.parent}, handler_class=TokenCheckingHandler)
    try:
        href = f"{server.url}/s1/{src.name}"
        real_clock = lambda: datetime.now(timezone.utc)  # noqa: E731
        expired = FakeTokens(lambda: real_clock() - timedelta(hours=2))(href)  # token that expired an hour ago
        refused = r"access refused \(HTTP 403\)"
        with pytest.raises(AssetReadError, match=refused) as info, open_asset(expired):
            pass
        assert "sig=" not in str(info.value)  # tokens are never printed
        tokens = FakeTokens(real_clock)
        resigner = Resigner(tokens)
        with open_asset(expired, resign=resigner) as ds, rasterio.open(src) as local:
            np.testing.assert_array_equal(
                ds.read(1, window=((0, 16), (0, 16))), local.read(1, window=((0, 16), (0, 16)))
            )
        assert resigner.count == 1 and tokens.issued == 1
    finally:
        server.close()
