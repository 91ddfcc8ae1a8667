"""Sidecar styles that make class maps open coloured and labelled in GIS tools.

A class-map COG already carries a colour table (GDAL palette) and its class names in a metadata tag. Two sidecars
add the names where tools look for them:

* ``<name>.qml``: a QGIS layer style (paletted renderer: value, colour, label per class); QGIS loads a ``.qml``
  with the same base name as a raster automatically when the layer is added;
* ``<name>.tif.aux.xml``: GDAL's PAM sidecar with the band's category names, read by GDAL itself (``gdalinfo``),
  rasterio (``src.tags()`` does not show them, GDAL's API does) and tools built on GDAL.

Written by hand (a few lines of XML each) because no maintained library writes either; both formats are stable.
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

from pipeline import storage
from pipeline.palette import CLASS_NODATA


def _stem(cog_path: str) -> str:
    head, dot, ext = cog_path.rpartition(".")
    return head if dot and ext.lower() in ("tif", "tiff") else cog_path


def qgis_paletted_style(names: list[str], colors: list[str]) -> str:
    """A QGIS ``.qml`` style: a paletted renderer of band 1 with one entry per class; no-data (255) transparent."""
    entries = "\n".join(
        f'        <paletteEntry value="{i}" color={quoteattr(c)} label={quoteattr(n)} alpha="255"/>'
        for i, (n, c) in enumerate(zip(names, colors))
    )
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.28" styleCategories="AllStyleCategories">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <rasterTransparency>
        <singleValuePixelList>
          <pixelListEntry min="{CLASS_NODATA}" max="{CLASS_NODATA}" percentTransparent="100"/>
        </singleValuePixelList>
      </rasterTransparency>
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
"""


def gdal_category_names(names: list[str]) -> str:
    """A GDAL PAM ``.aux.xml`` naming the categories (class values) of band 1."""
    cats = "\n".join(f"      <Category>{_escape(n)}</Category>" for n in names)
    return f"""<PAMDataset>
  <PAMRasterBand band="1">
    <Description>classes</Description>
    <CategoryNames>
{cats}
    </CategoryNames>
  </PAMRasterBand>
</PAMDataset>
"""


def _escape(text: str) -> str:
    return quoteattr(text)[1:-1]


def write_class_style(cog_path: str, names: list[str], colors: list[str]) -> list[str]:
    """Write ``<stem>.qml`` and ``<cog>.aux.xml`` beside a class-map COG; returns their paths."""
    qml, aux = f"{_stem(cog_path)}.qml", f"{cog_path}.aux.xml"
    storage.write_bytes(qml, qgis_paletted_style(names, colors).encode())
    storage.write_bytes(aux, gdal_category_names(names).encode())
    return [qml, aux]
