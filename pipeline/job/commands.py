"""``skypipe run JOB.yaml`` (the whole journey of a job) and ``skypipe status JOB.yaml``: thin wrappers."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` and ``status`` commands."""
    run = subparsers.add_parser(
        "run", help="run (or resume) a job: cube if missing -> inference -> mosaic -> COG -> archive -> quicklooks"
    )
    run.add_argument("job", help="job spec YAML (see jobs/)")
    run.add_argument(
        "--address", default=None, help="Ray cluster, e.g. ray://HEAD:10001 (default: $RAY_ADDRESS, else local Ray)"
    )
    run.add_argument("--max-attempts", type=int, default=3, help="attempts per tile before it is recorded failed")
    run.add_argument("--allow-failed", action="store_true", help="mosaic the finished tiles even if some failed")
    run.add_argument(
        "--break-lease", action="store_true", help="take over the outputs from an earlier run known to be dead"
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    run.add_argument(
        "--dashboard", action="store_true", help="start the local Ray's dashboard on 127.0.0.1 (prints its URL)"
    )
    run.set_defaults(func=_run)

    status = subparsers.add_parser("status", help="what is done per stage of a job (cube, tiles, mosaic, COG, ...)")
    status.add_argument("job", help="job spec YAML")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(func=_status)


def _run(args: argparse.Namespace) -> int:
    from pipeline.job.run import run_job
    from pipeline.spec import load_job

    job = load_job(args.job)
    summary = run_job(
        job, address=args.address, progress=not args.no_progress, allow_failed=args.allow_failed,
        max_attempts=args.max_attempts, break_lease=args.break_lease, dashboard=args.dashboard,
    )  # fmt: skip
    print(summary.format())
    return summary.exit_code


def _status(args: argparse.Namespace) -> int:
    from pipeline.job.status import format_status, job_status
    from pipeline.spec import load_job

    status = job_status(load_job(args.job))
    print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
    return 0
