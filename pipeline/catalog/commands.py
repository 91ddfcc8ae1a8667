"""``skypipe catalog ...``: show, index, build-local, serve and search. Thin: parse -> typed config -> library."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from pipeline.catalog.config import load_catalog
from pipeline.catalog.index import build_local_catalog, index_recipe
from pipeline.catalog.recipe import DEFAULT_LOCAL_CATALOG_DIR, CollectionRecipe, DatetimeRule, IndexRecipe, load_recipe

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``catalog`` command group."""
    p = subparsers.add_parser("catalog", help="STAC catalogs: show, index local files, serve, search")
    sub = p.add_subparsers(dest="catalog_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    s = sub.add_parser("show", help="print a catalog definition (catalogs/<name>.yaml or a path)")
    s.add_argument("catalog")
    s.set_defaults(func=_show)

    s = sub.add_parser("index", help="turn local GeoTIFFs / JP2s into a static STAC catalog")
    s.add_argument("dir", nargs="?", help="folder to index (omit with --recipe)")
    s.add_argument("--out", required=True, help="output catalog folder")
    s.add_argument("--recipe", help="index recipe YAML (see catalogs/local-index.yaml); replaces the flags below")
    s.add_argument("--collection", help="collection id (default: the folder's name)")
    s.add_argument("--glob", default="**/*.tif", help="files to index below DIR (default: **/*.tif)")
    s.add_argument("--asset", default="data", help="asset key of a multi-band file (default: data)")
    s.add_argument("--bands", help="comma-separated band names (default: the files' band descriptions)")
    s.add_argument("--group", help="regex with named groups 'item' and 'band': one single-band file per band")
    dt = s.add_mutually_exclusive_group(required=False)
    dt.add_argument("--datetime", dest="fixed", help="fixed ISO datetime for every item")
    dt.add_argument("--datetime-regex", help="regex on the file name; group 'dt' (or 1) holds the time")
    dt.add_argument("--datetime-tag", help="GeoTIFF metadata tag holding an ISO datetime")
    s.add_argument("--datetime-format", help="strptime format for --datetime-regex (default ISO 8601)")
    s.set_defaults(func=_index)

    s = sub.add_parser("build-local", help="build the local sample catalog from catalogs/local-index.yaml")
    s.add_argument("--out", default=str(DEFAULT_LOCAL_CATALOG_DIR), help="output folder (default: %(default)s)")
    s.add_argument("--collections", help="comma-separated subset of the recipe's collections")
    s.set_defaults(func=_build_local)

    s = sub.add_parser("serve", help="serve a static catalog as a STAC API on 127.0.0.1 (rustac + range server)")
    s.add_argument("catalog_dir", help="static catalog folder, or the name of a local catalog (e.g. local)")
    s.add_argument("--port", type=int, default=0, help="STAC API port (default: a free one)")
    s.add_argument("--assets-port", type=int, default=0, help="asset server port (default: a free one)")
    s.set_defaults(func=_serve)

    s = sub.add_parser("search", help="search a catalog and print a summary table")
    s.add_argument("catalog", help="catalog name (catalogs/<name>.yaml) or YAML path")
    region = s.add_mutually_exclusive_group(required=True)
    region.add_argument("--bbox", help="west,south,east,north in degrees")
    region.add_argument("--geojson", help="GeoJSON file with the region")
    s.add_argument("--start", required=True, help="first day (YYYY-MM-DD) or ISO datetime")
    s.add_argument("--end", required=True, help="last day (YYYY-MM-DD) or ISO datetime")
    s.add_argument("--modalities", default="s2,s1", help="comma-separated modalities (default: %(default)s)")
    s.add_argument("--max-cloud", type=float, help="maximum cloud cover in percent")
    s.add_argument("--url", help="STAC API root to use (e.g. a running `skypipe catalog serve`)")
    s.add_argument("--limit", type=int, default=100, help="page size (default: %(default)s)")
    s.add_argument("--max-items", type=int, help="at most this many items per modality")
    s.set_defaults(func=_search)


def _show(args: argparse.Namespace) -> int:
    cat = load_catalog(args.catalog)
    print(f"{cat.name} ({cat.kind}) {cat.url or cat.local_path()}  signing: {cat.signing}")
    for name, src in cat.modalities.items():
        print(f"  {name}: {src.collection} [{src.processing_level or '-'}] {src.units}, gsd {src.gsd:g} m")
        print(f"      bands {dict(src.assets)}")
    return 0


def _index(args: argparse.Namespace) -> int:
    if args.recipe:
        recipe = load_recipe(args.recipe)
    else:
        if not args.dir:
            raise ValueError("give a folder to index, or --recipe")
        root = Path(args.dir).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder")
        if not (args.fixed or args.datetime_regex or args.datetime_tag):
            raise ValueError("say how items get their datetime: --datetime, --datetime-regex or --datetime-tag")
        rule = DatetimeRule(
            fixed=args.fixed, regex=args.datetime_regex, tag=args.datetime_tag, format=args.datetime_format
        )
        collection = CollectionRecipe(
            root=str(root),
            glob=args.glob,
            datetime=rule,
            asset=args.asset,
            group=args.group,
            bands=args.bands.split(",") if args.bands else None,
        )
        recipe = IndexRecipe(collections={args.collection or root.name: collection}, base_dir=Path.cwd())
    print(index_recipe(recipe, args.out).summary())
    return 0


def _build_local(args: argparse.Namespace) -> int:
    collections = args.collections.split(",") if args.collections else None
    report = build_local_catalog(args.out, collections=collections)
    print(report.summary())
    return 0 if report.items else 1


def _serve(args: argparse.Namespace) -> int:
    from pipeline.catalog.serve import LocalStacServer

    path = Path(args.catalog_dir)
    if not path.is_dir():
        path = load_catalog(args.catalog_dir).local_path()
    with LocalStacServer(path, port=args.port, assets_port=args.assets_port) as srv:
        print(f"STAC API  {srv.url}\nassets    {srv.assets_url}\ncollections {', '.join(srv.collections)}")
        print("Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def _search(args: argparse.Namespace) -> int:
    from pipeline.catalog.search import EmptySearchError, search

    cat = load_catalog(args.catalog)
    try:
        result = search(
            cat,
            region=args.bbox or args.geojson,
            start=args.start,
            end=args.end,
            modalities=[m.strip() for m in args.modalities.split(",") if m.strip()],
            max_cloud=args.max_cloud,
            url=args.url,
            limit=args.limit,
            max_items=args.max_items,
        )
    except EmptySearchError as err:
        raise ValueError(str(err)) from None
    print(result.summary())
    return 0
