"""Shared fixtures: the local sample catalog, built once per session and served on loopback.

Use from a test module with ``pytest_plugins = ["catalog_fixtures"]`` (pytest puts ``tests/`` on ``sys.path``;
pytest 9 accepts ``pytest_plugins`` in test modules), or list it in a conftest's ``pytest_plugins``. Do not import
the fixtures by name. All skip (with the reason) when the shared sample data is absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from shared_data import require

from pipeline.catalog.index import build_local_catalog
from pipeline.catalog.serve import LocalStacServer


def require_shared_data() -> Path:
    """The shared data folder, or skip the test when it is absent."""
    return require()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared sample-data folder (``$SKYPIPE_SHARED_DATA`` or ``../shared/data``); skips when absent."""
    return require_shared_data()


@pytest.fixture(scope="session")
def local_catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local sample catalog (catalogs/local-index.yaml) built into a session temp folder."""
    require_shared_data()
    out = tmp_path_factory.mktemp("local-catalog")
    report = build_local_catalog(out)
    if not report.items:
        pytest.skip(f"no local sample collection could be built: {report.skipped}")
    return out


@pytest.fixture(scope="session")
def local_stac_server(local_catalog_dir: Path) -> Iterator[LocalStacServer]:
    """The local sample catalog served as a STAC API (``.url``) with a range-request asset server (``.assets_url``).

    Point catalog configs at it with ``search(..., url=local_stac_server.url)`` or ``SKYPIPE_LOCAL_CATALOG``.
    """
    with LocalStacServer(local_catalog_dir) as srv:
        yield srv
