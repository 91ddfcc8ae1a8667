"""``skypipe view``: a thin wrapper over :func:`pipeline.view.server.serve`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``view`` command."""
    s = subparsers.add_parser("view", help="web map of a job's outputs or an archive on 127.0.0.1 (click to search)")
    s.add_argument("target", help="a job's output folder, an archive, or a classify / change / search output folder")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    s.add_argument("--port", type=int, default=8765, help="(default: %(default)s)")
    s.set_defaults(func=_view)


def _view(args: argparse.Namespace) -> int:
    import threading

    from pipeline.view.server import serve

    ready = threading.Event()
    url = f"http://{args.host}:{args.port}/"
    announce = threading.Thread(
        target=lambda: ready.wait() and print(f"skypipe view: {url} (Ctrl-C to stop)", flush=True)
    )
    announce.daemon = True
    announce.start()
    serve(args.target, host=args.host, port=args.port, ready=ready)
    return 0
