"""STAC catalogs: catalog configs, search, signing, local-file indexing and a loopback STAC API server."""

from pipeline.catalog.config import CatalogConfig, CatalogConfigError, ModalitySource, load_catalog, split_band_ref

__all__ = ["CatalogConfig", "CatalogConfigError", "ModalitySource", "load_catalog", "split_band_ref"]
