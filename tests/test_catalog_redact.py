"""Secrets in hrefs and messages: what is stored drops them, what is logged or printed masks them."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from pipeline.catalog.redact import RedactingFilter, install_redaction, public_href, redact
from pipeline.catalog.signing import SAS_TOKEN_ENV, env_sas_sign_href, make_resigner, strip_token

SAS = "st=2026-11-22T00%3A00%3A00Z&se=2026-11-22T01%3A00%3A00Z&sp=rl&sv=2024-05-04&sr=c&sig=K3y%2Fs3cr3t%3D"
BLOB = "https://acct.blob.core.windows.net/sentinel2-l2/T31/B04.tif"


def test_public_href_drops_secret_parameters_and_keeps_the_rest():
    assert public_href(f"{BLOB}?{SAS}") == BLOB
    assert public_href(f"{BLOB}?keep=1&{SAS}") == f"{BLOB}?keep=1"
    presigned = "https://b.s3.amazonaws.com/a.tif?X-Amz-Credential=AKIA%2Fx&X-Amz-Signature=abc&x-id=GetObject"
    assert public_href(presigned) == "https://b.s3.amazonaws.com/a.tif?x-id=GetObject"
    assert public_href("https://user:pw@host/a.tif?token=t") == "https://user@host/a.tif"
    for unchanged in ("/data/a.tif", "s3://bucket/a.tif", "https://h/a.tif?x=a+b&y=%2F"):
        assert public_href(unchanged) == unchanged  # nothing secret: byte for byte


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (f"cannot open '/vsicurl/{BLOB}?{SAS}' (HTTP 403)", ["/vsicurl/" + BLOB, "(HTTP 403)", "sr=REDACTED"]),
        (f"B04.tif?{SAS}: TIFFReadDirectory:Failed to read", ["B04.tif?st=REDACTED", ": TIFFReadDirectory"]),
        ('"GET /s2/B04.tif?keep=1&sig=abc HTTP/1.1" 206 -', ["keep=1&sig=REDACTED HTTP/1.1"]),
        ("retry with token=abc123, then give up", ["token=REDACTED, then"]),
        ("X-Amz-Signature=deadbeef&X-Amz-Security-Token=FQo", ["X-Amz-Signature=REDACTED"]),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.x", ["Bearer REDACTED"]),
        ("https://user:hunter22@host/a.tif", ["user:REDACTED@host"]),
    ],
)
def test_redact_masks_secrets_in_free_text(text, kept):
    out = redact(text)
    for secret in ("K3y", "abc", "deadbeef", "FQo", "eyJ", "hunter22"):
        assert secret not in out
    for part in kept:
        assert part in out


def test_redact_leaves_ordinary_text_alone():
    for text in ("first=1 signed=2 designed=3", "st=5 in prose is not a query", "HTTP response code: 404"):
        assert redact(text) == text


def test_filter_rewrites_message_args_and_traceback(caplog):
    log = logging.getLogger("pipeline.test_redact")
    with caplog.at_level(logging.DEBUG, logger="pipeline.test_redact"):
        log.warning("asset %s: %s", f"{BLOB}?{SAS}", "refused")
        try:
            raise OSError(f"read failed: /vsicurl/{BLOB}?{SAS}")
        except OSError:
            log.exception("chunk failed")
    assert "K3y" not in caplog.text and "refused" in caplog.text and "chunk failed" in caplog.text
    assert all("K3y" not in r.getMessage() for r in caplog.records)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "href %s", (f"{BLOB}?{SAS}",), None)
    assert RedactingFilter().filter(record) and record.getMessage() == f"href {BLOB}?{SAS}".replace(
        SAS, "st=REDACTED&se=REDACTED&sp=REDACTED&sv=REDACTED&sr=REDACTED&sig=REDACTED"
    )


def test_handlers_added_after_install_are_covered_and_install_is_idempotent(tmp_path):
    install_redaction()
    install_redaction()
    factory = logging.getLogRecordFactory()
    install_redaction()
    assert logging.getLogRecordFactory() is factory
    handler = logging.FileHandler(tmp_path / "late.log")
    log = logging.getLogger("pipeline.test_redact.late")
    log.addHandler(handler)
    try:
        log.error("opened %s", f"{BLOB}?{SAS}")
    finally:
        log.removeHandler(handler)
        handler.close()
    assert "K3y" not in (tmp_path / "late.log").read_text()


def test_warnings_are_redacted():
    install_redaction()
    text = warnings.formatwarning(f"slow read of {BLOB}?{SAS}", UserWarning, "x.py", 1)
    assert "K3y" not in text and BLOB in text


def test_uncaught_traceback_is_redacted():
    code = f"import pipeline.catalog\nraise RuntimeError('cannot read {BLOB}?{SAS}')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "RuntimeError: cannot read" in proc.stderr and "K3y" not in proc.stderr


def test_sas_token_signing_mode(monkeypatch):
    monkeypatch.delenv(SAS_TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match=rf"\${SAS_TOKEN_ENV} is not set"):
        make_resigner("sas-token")  # before any search
    monkeypatch.setenv(SAS_TOKEN_ENV, "?" + SAS)
    resigner = make_resigner("sas-token")
    assert resigner is not None
    assert resigner(f"{BLOB}?keep=1") == f"{BLOB}?keep=1&{SAS}"
    assert env_sas_sign_href(f"{BLOB}?{SAS}") == f"{BLOB}?{SAS}"  # an old token is replaced, not appended to
    assert strip_token(resigner.fresh(BLOB)) == BLOB
