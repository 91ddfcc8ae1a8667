"""Few-shot class maps from an embedding archive: a probe fitted on a handful of labelled points or polygons.

No backbone forward: the probe reads only the archive's stored embeddings (dequantised int8 pixels). Labels are
points or polygons with a class column (GeoJSON, GeoPackage, GeoParquet; any CRS). Every label contributes the
embeddings of the pixels it covers (a point: its pixel; a polygon: the pixels whose centres it contains, at most
``max_pixels_per_label`` of them, seeded), all L2-normalised (the archive's similarity is cosine).

Probes: ``logistic`` (multinomial logistic regression, balanced class weights; default) or ``knn`` (cosine k nearest
labelled pixels). Accuracy is cross-validated over *labels*, not pixels (the pixels of one polygon are never split
between training and test, which would flatter the probe): stratified group k-fold with ``k = min(5, labels of the
rarest class)``; fewer than 2 labels in a class means no cross-validation, and the report says so.

Outputs in ``out`` (the writers of segmentation jobs, on a class mosaic in the stitcher's layout)::

    mosaic.zarr          probabilities (band = class names) + ``classes`` uint8 + valid, product ``classes``
    probabilities.tif    COG, one ``p(<class>)`` band per class
    classes.tif          class map COG with colour table (+ .qml / .aux.xml sidecars)
    polygons.parquet     class polygons (GeoParquet)
    areas.csv, areas.json   area per class
    quicklook.png        class map with a legend
    probe.json           labels per class, cross-validated accuracy (mean, std, per fold), per-class recall,
                         the majority-class baseline, probe settings, provenance
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import geopandas as gpd
import numpy as np
import rasterio.features
import xarray as xr

from pipeline import storage
from pipeline.mosaic.archive import Archive, open_archive
from pipeline.palette import CLASS_NODATA, default_colors

log = logging.getLogger(__name__)

PROBES = ("logistic", "knn")


@dataclass
class LabelSamples:
    """Embeddings of labelled pixels: ``x (n, C)``, class index ``y (n,)``, the label each came from ``group (n,)``."""

    x: np.ndarray
    y: np.ndarray
    group: np.ndarray
    classes: list[str]
    per_class: dict[str, int] = field(default_factory=dict)  # labels (features) per class


def read_labels(path: str, class_column: str = "class") -> gpd.GeoDataFrame:
    """Labelled points / polygons with a class column; clear errors for empty files and single classes."""
    frame = gpd.read_parquet(path) if str(path).endswith(".parquet") else gpd.read_file(path)
    if frame.empty:
        raise ValueError(f"{path} holds no labels: add points or polygons with a {class_column!r} column")
    if class_column not in frame.columns:
        columns = [c for c in frame.columns if c != "geometry"]
        raise ValueError(f"{path} has no column {class_column!r} (columns: {columns}); name the class column with "
                         "--class-column")  # fmt: skip
    if frame.crs is None:
        raise ValueError(f"{path} has no CRS; GeoJSON is WGS84 by definition, other files must declare theirs")
    frame = frame[frame[class_column].notna() & frame.geometry.notna() & ~frame.geometry.is_empty]
    classes = sorted(frame[class_column].astype(str).unique())
    if len(classes) < 2:
        raise ValueError(f"{path} has labels of one class only ({classes}): a probe needs at least two classes")
    return frame.assign(**{class_column: frame[class_column].astype(str)})


def sample_labels(
    emb: xr.DataArray, labels: gpd.GeoDataFrame, class_column: str, *, max_pixels_per_label: int = 200, seed: int = 0
) -> LabelSamples:
    """Embeddings under each label (see the module docstring); labels off the mosaic or on no data are dropped."""
    crs = emb.rio.crs
    transform = emb.rio.transform()
    height, width = emb.sizes["y"], emb.sizes["x"]
    local = labels.to_crs(crs)
    classes = sorted(local[class_column].unique())
    rng = np.random.default_rng(seed)
    rows, cols, ys, groups = [], [], [], []
    for i, (geom, name) in enumerate(zip(local.geometry, local[class_column])):
        if geom.geom_type in ("Point", "MultiPoint"):
            pts = [geom] if geom.geom_type == "Point" else list(geom.geoms)
            rc = [rasterio.transform.rowcol(transform, p.x, p.y) for p in pts]
            r, c = np.array([int(v[0]) for v in rc]), np.array([int(v[1]) for v in rc])
        else:
            mask = rasterio.features.geometry_mask([geom], (height, width), transform, invert=True, all_touched=False)
            r, c = np.nonzero(mask)
            if len(r) > max_pixels_per_label:
                pick = rng.choice(len(r), size=max_pixels_per_label, replace=False)
                r, c = r[pick], c[pick]
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        rows.append(r[inside])
        cols.append(c[inside])
        ys.append(np.full(inside.sum(), classes.index(name)))
        groups.append(np.full(inside.sum(), i))
    r, c = np.concatenate(rows), np.concatenate(cols)
    x = np.asarray(emb.isel(y=xr.DataArray(r, dims="s"), x=xr.DataArray(c, dims="s")).transpose("s", "band").values)
    ok = np.isfinite(x).all(axis=1)
    y, group = np.concatenate(ys)[ok], np.concatenate(groups)[ok]
    per_class = {name: len(np.unique(group[y == k])) for k, name in enumerate(classes)}
    if ok.sum() == 0:
        raise ValueError("no label falls on an embedding of the archive (all outside the mosaic or on no data)")
    missing = [n for n, v in per_class.items() if v == 0]
    if missing:
        raise ValueError(f"no label of class(es) {missing} falls on an embedding of the archive (outside or no data)")
    return LabelSamples(_unit(x[ok]), y, group, classes, per_class)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def make_probe(probe: str, n_labels: int, k: int = 5) -> Any:
    """A scikit-learn classifier on unit-length embeddings."""
    if probe == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=10.0, class_weight="balanced", max_iter=2000)
    if probe == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        return KNeighborsClassifier(n_neighbors=max(1, min(k, n_labels)), metric="cosine", weights="distance")
    raise ValueError(f"unknown probe {probe!r}; choose one of {list(PROBES)}")


def cross_validate(samples: LabelSamples, probe: str, seed: int = 0) -> dict[str, Any]:
    """Cross-validated accuracy over labels (stratified group k-fold); says why when it cannot be done."""
    from sklearn.model_selection import StratifiedGroupKFold

    rarest = min(samples.per_class.values())
    majority = max(np.bincount(samples.y)) / len(samples.y)
    report: dict[str, Any] = {"labels_per_class": samples.per_class, "pixels": len(samples.y),
                              "majority_baseline": float(majority)}  # fmt: skip
    if rarest < 2:
        report["cv"] = None
        report["cv_note"] = (f"no cross-validation: class {min(samples.per_class, key=samples.per_class.get)!r} has "
                             f"{rarest} label; give at least 2 labels per class")  # fmt: skip
        return report
    folds = min(5, rarest)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    acc, bal, recall = [], [], np.zeros(len(samples.classes))
    counts = np.zeros(len(samples.classes))
    for train, test in splitter.split(samples.x, samples.y, samples.group):
        if len(np.unique(samples.y[train])) < 2:
            continue
        model = make_probe(probe, len(np.unique(samples.group[train]))).fit(samples.x[train], samples.y[train])
        pred = model.predict(samples.x[test])
        truth = samples.y[test]
        acc.append(float((pred == truth).mean()))
        per = [float((pred[truth == k] == k).mean()) for k in np.unique(truth)]
        bal.append(float(np.mean(per)))
        for k in np.unique(truth):
            recall[k] += (pred[truth == k] == k).sum()
            counts[k] += (truth == k).sum()
    report["cv"] = {
        "folds": len(acc), "accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
        "balanced_accuracy": float(np.mean(bal)), "per_fold": acc,
        "recall": {c: float(recall[k] / counts[k]) if counts[k] else None for k, c in enumerate(samples.classes)},
    }  # fmt: skip
    return report


def _predict_block(block: np.ndarray, model: Any, n_classes: int) -> np.ndarray:
    """``(C, h, w)`` embeddings -> ``(n_classes, h, w)`` float32 probabilities (NaN where no data)."""
    c, h, w = block.shape
    flat = block.reshape(c, -1).T
    ok = np.isfinite(flat).all(axis=1)
    out = np.full((h * w, n_classes), np.nan, np.float32)
    if ok.any():
        out[ok] = model.predict_proba(_unit(flat[ok])).astype(np.float32)
    return out.T.reshape(n_classes, h, w)


def class_mosaic(archive: Archive, mosaic: str, model: Any, classes: list[str], colors: list[str]) -> xr.Dataset:
    """The lazy class mosaic (stitcher layout, ``product`` ``classes``) of ``model`` over an archive mosaic."""
    from pipeline.mosaic.stitch import MOSAIC_VAR, class_map

    ds = archive.mosaic(mosaic)
    emb = archive.embeddings(mosaic)
    data = emb.data.rechunk({0: -1})
    probs = data.map_blocks(_predict_block, model, len(classes), chunks=(len(classes), *data.chunks[1:]),
                            dtype=np.float32)  # fmt: skip
    valid = da.isfinite(probs[0]).astype(np.uint8)
    out = xr.Dataset(
        {
            MOSAIC_VAR: (("band", "y", "x"), probs, {"long_name": "probability"}),
            "valid": (("y", "x"), valid),
            "classes": (("y", "x"), class_map(probs), {"long_name": "classes", "nodata": CLASS_NODATA}),
        },
        coords={"band": np.array(classes, dtype=object), "y": ds["y"].values, "x": ds["x"].values},
    )
    grid = {"crs": ds.rio.crs.to_string(), "transform": list(ds.rio.transform())[:6], "height": ds.sizes["y"],
            "width": ds.sizes["x"]}  # fmt: skip
    out.attrs = {"kind": "fewshot", "product": "classes", "channels": classes, "class_names": classes,
                 "class_colors": colors, "grid": grid, "provenance": ds.attrs.get("provenance") or archive.provenance,
                 "archive": archive.url, "archive_mosaic": mosaic}  # fmt: skip
    return out.rio.write_crs(ds.rio.crs).rio.write_transform(ds.rio.transform())


def _pick_mosaic(archive: Archive, labels: gpd.GeoDataFrame, mosaic: str | None) -> str:
    """The requested mosaic, else the one whose footprint holds most labels."""
    if mosaic:
        if mosaic not in archive.names:
            raise KeyError(f"{archive.url} has no mosaic {mosaic!r} (has {archive.names})")
        return mosaic
    best, count = None, -1
    for name in archive.names:
        emb = archive.embeddings(name)
        left, bottom, right, top = emb.rio.bounds()
        pts = labels.to_crs(emb.rio.crs).geometry.representative_point()
        n = int(((pts.x >= left) & (pts.x <= right) & (pts.y >= bottom) & (pts.y <= top)).sum())
        if n > count:
            best, count = name, n
    if count <= 0:
        b = labels.to_crs("EPSG:4326").total_bounds
        raise ValueError(f"no label lies on a mosaic of {archive.url} (labels span lon {b[0]:.4f}..{b[2]:.4f}, "
                         f"lat {b[1]:.4f}..{b[3]:.4f})")  # fmt: skip
    return best


def classify_archive(
    archive_url: str, labels_path: str, out_dir: str, *, class_column: str = "class", mosaic: str | None = None,
    probe: str = "logistic", max_pixels_per_label: int = 200, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """``skypipe archive classify``: fit a probe on labelled embeddings and map it over one archive mosaic.

    Returns:
        ``probe.json``'s content plus ``outputs`` (written paths) and the area table's summary ``lines``.
    """
    from pipeline.mosaic.areas import write_areas
    from pipeline.mosaic.cog import dataarray_to_cog, write_cog
    from pipeline.mosaic.quicklook import quicklook
    from pipeline.mosaic.stitch import MOSAIC_VAR, open_mosaic
    from pipeline.mosaic.vectors import write_polygons
    from pipeline.storage import store_path

    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {list(PROBES)}")
    labels = read_labels(labels_path, class_column)
    archive = open_archive(archive_url)
    name = _pick_mosaic(archive, labels, mosaic)
    samples = sample_labels(archive.embeddings(name), labels, class_column,
                            max_pixels_per_label=max_pixels_per_label, seed=seed)  # fmt: skip
    report = cross_validate(samples, probe, seed)
    model = make_probe(probe, len(np.unique(samples.group))).fit(samples.x, samples.y)
    colors = default_colors(len(samples.classes))
    ds = class_mosaic(archive, name, model, samples.classes, colors)
    join = storage.join
    paths = {"mosaic": join(out_dir, "mosaic.zarr")}
    ds.to_zarr(store_path(paths["mosaic"]), zarr_format=3, consolidated=False, mode="w")
    written = open_mosaic(paths["mosaic"])
    probs = written[MOSAIC_VAR].assign_coords(band=[f"p({c})" for c in samples.classes])
    tags = {"kind": "fewshot", "provenance": storage_json(written.attrs.get("provenance"))}
    paths["probabilities"] = dataarray_to_cog(probs, join(out_dir, "probabilities.tif"), tags=tags)
    paths["classes"] = write_cog(paths["mosaic"], join(out_dir, "classes.tif"), variable="classes")
    paths["polygons"], _ = write_polygons(paths["mosaic"], join(out_dir, "polygons.parquet"), job="fewshot")
    areas = write_areas(paths["mosaic"], join(out_dir, "areas.csv"), join(out_dir, "areas.json"), job="fewshot")
    paths["areas"] = join(out_dir, "areas.csv")
    paths["quicklook"] = quicklook(paths["mosaic"], join(out_dir, "quicklook.png"), "classes")
    report.update(probe=probe, classes=samples.classes, colors=colors, archive=archive_url, mosaic=name,
                  labels=str(labels_path), class_column=class_column, provenance=archive.provenance)  # fmt: skip
    storage.write_json(join(out_dir, "probe.json"), report, indent=1)
    paths["probe"] = join(out_dir, "probe.json")
    return {**report, "outputs": paths, "area_lines": areas.lines()}


def storage_json(obj: Any) -> str:
    """``obj`` as compact JSON text (COG tags)."""
    import json

    return json.dumps(obj, sort_keys=True, default=str)


def format_report(report: dict[str, Any]) -> list[str]:
    """Lines for the command line: labels per class, cross-validated accuracy (or why there is none), baseline."""
    lines = [f"probe {report['probe']} on {report['pixels']} labelled pixels of mosaic {report['mosaic']}: "
             + ", ".join(f"{c} {n} label(s)" for c, n in report["labels_per_class"].items())]  # fmt: skip
    cv = report.get("cv")
    if cv is None:
        lines.append(report.get("cv_note", "no cross-validation"))
    else:
        recall = ", ".join(f"{c} {v:.2f}" for c, v in cv["recall"].items() if v is not None)
        lines.append(f"cross-validated accuracy {cv['accuracy']:.3f} +- {cv['accuracy_std']:.3f} over {cv['folds']} "
                     f"folds of labels (balanced {cv['balanced_accuracy']:.3f}; recall {recall}); majority-class "
                     f"baseline {report['majority_baseline']:.3f}")  # fmt: skip
    return lines
