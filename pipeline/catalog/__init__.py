"""STAC catalogs: catalog configs, search, signing, local-file indexing and a loopback STAC API server.

Importing the package installs :func:`pipeline.catalog.redact.install_redaction` (idempotent): signed asset hrefs
are read here, so from here on no log record, warning or uncaught traceback of the process shows a token.
"""

from pipeline.catalog.config import CatalogConfig, CatalogConfigError, ModalitySource, load_catalog, split_band_ref
from pipeline.catalog.redact import install_redaction

install_redaction()

__all__ = [
    "CatalogConfig",
    "CatalogConfigError",
    "ModalitySource",
    "install_redaction",
    "load_catalog",
    "split_band_ref",
]
