"""Where skypipe finds its own files (catalogs, example jobs, the demo checkpoint) and where it builds local ones.

Looked up in this order, so a checkout, an installed wheel and a deployment with its own files all work from any
working directory:

1. ``$SKYPIPE_HOME/<name>`` when ``SKYPIPE_HOME`` is set (a deployment's own catalogs, jobs and checkpoints);
2. the source checkout the package runs from (``<repo>/catalogs``, ``<repo>/jobs``, ``<repo>/checkpoints``);
3. the files installed with the package (``<prefix>/share/skypipe/<name>``: the wheel's data files, see
   ``pyproject.toml``).

Relative paths inside those files (a local catalog's ``path: build/catalogs/local``) are resolved against
:func:`work_root`: ``$SKYPIPE_HOME``, else the checkout, else the current working directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HOME_ENV = "SKYPIPE_HOME"
NAMES = ("catalogs", "jobs", "checkpoints")


def checkout_root() -> Path | None:
    """The source checkout holding this package (``None`` for an installed wheel)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "catalogs").is_dir() else None


def installed_root() -> Path:
    """Where the wheel installs its data files."""
    return Path(sys.prefix) / "share" / "skypipe"


def resource_dir(name: str) -> Path:
    """The folder of ``catalogs``, ``jobs`` or ``checkpoints`` (see the module docstring for the order).

    Raises:
        FileNotFoundError: none of the places has it.
    """
    if name not in NAMES:
        raise ValueError(f"unknown resource {name!r}; known: {list(NAMES)}")
    home = os.environ.get(HOME_ENV)
    candidates = [Path(home).expanduser() / name] if home else []
    repo = checkout_root()
    candidates += [repo / name] if repo else []
    candidates.append(installed_root() / name)
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"skypipe's {name} folder was not found (looked at {[str(c) for c in candidates]}); "
                            f"set {HOME_ENV} to a folder holding {name}/")  # fmt: skip


def work_root() -> Path:
    """The folder relative paths of skypipe's own files resolve against (local catalogs are built under it)."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser()
    return checkout_root() or Path.cwd()
