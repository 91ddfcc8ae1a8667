"""``skypipe mosaic ...`` and ``skypipe archive ...``: thin wrappers over :mod:`pipeline.mosaic`.

The library modules are imported inside the handlers so that ``skypipe --help`` stays fast.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``mosaic`` and ``archive`` command groups."""
    p = subparsers.add_parser("mosaic", help="stitch tiles into a mosaic; write COGs and quicklooks")
    sub = p.add_subparsers(dest="mosaic_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    s = sub.add_parser("stitch", help="blend the done tiles of a tiles.zarr into a Zarr mosaic")
    s.add_argument("tiles", help="tile store (JOB/tiles.zarr), local path or fsspec URL")
    s.add_argument("--out", required=True, help="output mosaic.zarr")
    s.add_argument("--chunks", type=int, default=512, help="output block side in pixels (default: %(default)s)")
    s.add_argument("--no-blend", action="store_true", help="plain average of overlaps instead of a cosine taper")
    s.set_defaults(func=_stitch)

    s = sub.add_parser("cog", help="write (bands of) a mosaic as a Cloud-Optimised GeoTIFF")
    s.add_argument("mosaic")
    s.add_argument("--out", required=True, help="output .tif")
    s.add_argument("--bands", help="comma-separated channel names (default: all)")
    s.add_argument("--classes", action="store_true", help="write the uint8 class map (segmentation / change)")
    s.set_defaults(func=_cog)

    s = sub.add_parser("quicklook", help="PNG quicklook (PCA RGB, class palette with legend, or a colour ramp)")
    s.add_argument("mosaic", help="mosaic.zarr or a single-band GeoTIFF")
    s.add_argument("--out", required=True, help="output .png")
    s.add_argument("--style", choices=["pca", "classes", "ramp"], help="default: from the mosaic's product")
    s.add_argument("--max-size", type=int, default=1024, help="long side in pixels (default: %(default)s)")
    s.set_defaults(func=_quicklook)

    a = subparsers.add_parser(
        "archive", help="embedding archives: build, append, index, search, classify, change, query"
    )
    asub = a.add_subparsers(dest="archive_command", metavar="SUBCOMMAND")
    a.set_defaults(func=lambda args: a.print_help() or 2)

    s = asub.add_parser("build", help="create an archive from an embedding mosaic and its tile store")
    s.add_argument("mosaic")
    s.add_argument("tiles")
    s.add_argument("--out", required=True, help="archive folder (replaced if it exists)")
    s.add_argument("--float", action="store_true", help="store float32 instead of int8")
    s.add_argument("--patch-size", type=int, default=8, help="patch table cell side in grid cells (default: 8)")
    s.add_argument("--break-lease", action="store_true", help="take over from a writer known to be dead")
    s.set_defaults(func=_build)

    s = asub.add_parser("append", help="add a mosaic of the same model and preprocessing to an archive")
    s.add_argument("archive")
    s.add_argument("mosaic")
    s.add_argument("tiles")
    s.add_argument("--name", help="mosaic name inside the archive (default: the next number)")
    s.add_argument("--break-lease", action="store_true", help="take over from a writer known to be dead")
    s.set_defaults(func=_append)

    s = asub.add_parser("index", help="bring the patch table and nearest-neighbour index up to date (resumes)")
    s.add_argument("archive")
    s.add_argument("--rebuild", action="store_true", help="retrain the index and re-encode every shard")
    s.add_argument("--patch-size", type=int, default=8, help="for archives without a patch table (default: 8)")
    s.add_argument("--break-lease", action="store_true", help="take over from a writer known to be dead")
    s.set_defaults(func=_index)

    s = asub.add_parser(
        "search", help="top-k most similar patches (GeoParquet + quicklook) to a point, polygon or vector"
    )
    s.add_argument("archive")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--lonlat", nargs=2, type=float, metavar=("LON", "LAT"), help="the patch at this point")
    q.add_argument("--geometry", metavar="FILE", help="mean vector of the patches inside these polygons")
    q.add_argument("--vector", metavar="FILE", help="query.json of an earlier search, or .npy with --trust-vector")
    s.add_argument("--trust-vector", action="store_true", help="accept a vector without provenance")
    s.add_argument("--k", type=int, default=100, help="hits to return (default: %(default)s)")
    s.add_argument("--bbox", nargs=4, type=float, metavar=("W", "S", "E", "N"), help="only patches inside (degrees)")
    s.add_argument("--time", nargs=2, metavar=("START", "END"), help="only mosaics whose time range overlaps")
    s.add_argument("--mosaic", action="append", help="only this mosaic (repeatable)")
    s.add_argument("--nprobe", type=int, help="inverted lists to scan (default: the index's)")
    s.add_argument("--out", required=True, help="output folder: hits.parquet, query.json, quicklook.png")
    s.add_argument("--no-quicklook", action="store_true", help="skip quicklook.png (its PCA reads the mosaic: ~2 s)")
    s.set_defaults(func=_search)

    s = asub.add_parser("classify", help="few-shot class map from labelled points / polygons (a probe on embeddings)")
    s.add_argument("archive")
    s.add_argument("--labels", required=True, help="points or polygons with a class column (GeoJSON, GPKG, Parquet)")
    s.add_argument("--class-column", default="class", help="(default: %(default)s)")
    s.add_argument("--probe", choices=["logistic", "knn"], default="logistic", help="(default: %(default)s)")
    s.add_argument("--mosaic", help="archive mosaic to map (default: the one holding most labels)")
    s.add_argument("--out", required=True, help="output folder (COGs, polygons, areas, quicklook, probe.json)")
    s.set_defaults(func=_classify)

    s = asub.add_parser("change", help="cosine-distance change map and hotspots between two mosaics of one model")
    s.add_argument("a", help="archive A")
    s.add_argument("b", help="archive B (the same as A to compare two of its mosaics)")
    s.add_argument("--a-mosaic", help="mosaic of A (default: its first)")
    s.add_argument("--b-mosaic", help="mosaic of B (default: its first; its last when B is A)")
    s.add_argument("--threshold", type=float, help="cosine distance above which a pixel changed (default: Otsu)")
    s.add_argument("--min-area", type=float, default=0.0, help="drop hotspots smaller than this, m2")
    s.add_argument("--out", required=True, help="output folder (distance.tif, hotspots.parquet, quicklook.png)")
    s.set_defaults(func=_change)

    s = asub.add_parser("query", help="cosine-similarity map (COG + PNG) to a query point or vector")
    s.add_argument("archive")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--lonlat", nargs=2, type=float, metavar=("LON", "LAT"), help="query point in degrees")
    q.add_argument("--xy", nargs=2, type=float, metavar=("X", "Y"), help="query point in the mosaic CRS")
    q.add_argument("--vector", metavar="FILE.npy", help="query embedding, shape (C,)")
    s.add_argument("--mosaic", help="only this mosaic of the archive (default: all)")
    s.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.tif and PREFIX.png")
    s.set_defaults(func=_query)


def _stitch(args: argparse.Namespace) -> int:
    from pipeline.mosaic.stitch import stitch_tiles

    print(stitch_tiles(args.tiles, args.out, args.chunks, blend=not args.no_blend))
    return 0


def _cog(args: argparse.Namespace) -> int:
    from pipeline.mosaic.cog import write_cog

    bands = args.bands.split(",") if args.bands else None
    print(write_cog(args.mosaic, args.out, bands, variable="classes" if args.classes else None))
    return 0


def _quicklook(args: argparse.Namespace) -> int:
    from pipeline.mosaic.quicklook import quicklook

    print(quicklook(args.mosaic, args.out, args.style, max_size=args.max_size))
    return 0


def _build(args: argparse.Namespace) -> int:
    from pipeline.mosaic.archive import build_archive

    print(build_archive(args.mosaic, args.tiles, args.out, quantize=not args.float, break_lease=args.break_lease,
                        patch_size=args.patch_size))  # fmt: skip
    return 0


def _index(args: argparse.Namespace) -> int:
    from pipeline.mosaic.archive import index_archive

    state = index_archive(args.archive, rebuild=args.rebuild, break_lease=args.break_lease, size=args.patch_size)
    print(f"{args.archive}: {state.get('next_id', 0)} patch vectors in {len(state.get('shards', []))} shard(s), "
          f"{state.get('factory')} (nprobe {state.get('nprobe')})")  # fmt: skip
    return 0


def _search(args: argparse.Namespace) -> int:
    from pipeline.mosaic.search import search_archive

    result, paths = search_archive(
        args.archive, args.out, lonlat=args.lonlat and tuple(args.lonlat), geometry=args.geometry, vector=args.vector,
        trust_vector=args.trust_vector, k=args.k, bbox=args.bbox and tuple(args.bbox),
        time_range=args.time and tuple(args.time), mosaics=args.mosaic, nprobe=args.nprobe,
        quicklook=not args.no_quicklook,
    )  # fmt: skip
    sec = result.seconds
    best = f", best {result.hits['score'].iloc[0]:.4f}" if len(result.hits) else ""
    print(f"{len(result.hits)} hits of {result.query['selected_rows']} patches{best}; "
          f"search {1e3 * sec['search']:.1f} ms "
          f"(filter {1e3 * sec['filter']:.1f} ms, index load {sec['index_load']:.2f} s)")  # fmt: skip
    print("\n".join(paths.values()))
    return 0


def _append(args: argparse.Namespace) -> int:
    from pipeline.mosaic.archive import append_to_archive

    print(append_to_archive(args.archive, args.mosaic, args.tiles, name=args.name, break_lease=args.break_lease))
    return 0


def _query(args: argparse.Namespace) -> int:
    import numpy as np

    from pipeline.mosaic.query import query_archive

    vector = np.load(args.vector) if args.vector else None
    paths = query_archive(
        args.archive, args.out, lonlat=args.lonlat and tuple(args.lonlat), xy=args.xy and tuple(args.xy),
        vector=vector, mosaic=args.mosaic,
    )  # fmt: skip
    print("\n".join(paths))
    return 0


def _classify(args: argparse.Namespace) -> int:
    from pipeline.mosaic.fewshot import classify_archive, format_report

    report = classify_archive(args.archive, args.labels, args.out, class_column=args.class_column,
                              mosaic=args.mosaic, probe=args.probe)  # fmt: skip
    print("\n".join([*format_report(report), *report["area_lines"], *report["outputs"].values()]))
    return 0


def _change(args: argparse.Namespace) -> int:
    from pipeline.mosaic.embchange import embedding_change

    r = embedding_change(args.a, args.b, args.out, a_mosaic=args.a_mosaic, b_mosaic=args.b_mosaic,
                         threshold=args.threshold, min_area_m2=args.min_area)  # fmt: skip
    print(f"threshold {r['threshold']:.4f} ({r['method']}): {r['hotspots']} hotspot(s), "
          f"{r['hotspot_area_m2'] / 1e6:.4f} km2, {100 * r['changed_share']:.1f} % of the pixels changed")  # fmt: skip
    print("\n".join(r["outputs"].values()))
    return 0
