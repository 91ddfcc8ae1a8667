"""``skypipe cube build JOB.yaml`` and ``skypipe cube info CUBE``: thin wrappers over the library."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cube`` command group."""
    cube = subparsers.add_parser("cube", help="build and inspect Zarr cubes")
    sub = cube.add_subparsers(dest="cube_command", metavar="SUBCOMMAND", required=True)

    build = sub.add_parser("build", help="search the job's catalog and build (or resume) its Zarr cube")
    build.add_argument("job", help="job spec YAML (see jobs/cube-*.yaml)")
    build.add_argument("--overwrite", action="store_true", help="replace a cube built from a different plan")
    build.add_argument("--workers", type=int, default=None, help="reader/writer threads (default: 2 x CPU cores)")
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    build.set_defaults(func=_build)

    info = sub.add_parser("info", help="print a cube's modalities, dates, shape, CRS and valid fractions")
    info.add_argument("path", help="cube path or fsspec URL")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> int:
    from pipeline.cube.info import cube_info, format_info
    from pipeline.cube.job import build_from_job
    from pipeline.spec import load_job

    job = load_job(args.job)
    report = build_from_job(job, overwrite=args.overwrite, progress=not args.no_progress, workers=args.workers)
    print(format_info(cube_info(report.url)))
    for name, counts in report.chunks.items():
        print(
            f"[{name}] chunks: {counts['total']} total, {counts['skipped']} already done, {counts['written']} written"
        )
        for f in report.failures[name]:
            print(f"  failed chunk {f['index']}: items {f.get('items')}: {f.get('error')}")
    for path in report.quicklooks:
        print(f"quicklook {path}")
    print(f"built in {report.seconds:.1f} s")
    return 0


def _info(args: argparse.Namespace) -> int:
    from pipeline.cube.info import cube_info, format_info

    info = cube_info(args.path)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0
