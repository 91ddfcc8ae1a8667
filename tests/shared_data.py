"""The one way tests find the shared real sample data (``../shared/data``), and skip cleanly without it.

The folder is ``$SKYPIPE_SHARED_DATA`` when set, else ``../shared/data`` beside the repository
(:func:`pipeline.catalog.recipe.shared_data_dir`, which the local catalogs use too). Never an absolute path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.catalog.recipe import shared_data_dir


def shared_path(relative: str = "") -> Path:
    """``relative`` inside the shared data folder (it may not exist: check, or use :func:`require`)."""
    return shared_data_dir() / relative if relative else shared_data_dir()


def has_shared(relative: str = "") -> bool:
    """Whether ``relative`` exists in the shared data folder (for the folder itself: whether it holds the data,
    judged by its README, so an empty folder counts as absent)."""
    path = shared_path(relative)
    return (path if relative else path / "README.md").exists()


def require(relative: str = "") -> Path:
    """The path of ``relative`` in the shared data, or skip the calling test (with where it looked)."""
    path = shared_path(relative)
    if not has_shared(relative):
        pytest.skip(f"shared sample data not found at {path} (set SKYPIPE_SHARED_DATA)")
    return path


def needs_shared(relative: str = "") -> pytest.MarkDecorator:
    """A ``skipif`` marker for tests (or modules) that need ``relative`` from the shared data."""
    return pytest.mark.skipif(not has_shared(relative), reason=f"shared sample data not found at {shared_path()}")
