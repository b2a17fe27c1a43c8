"""The command line of scripts/08_serve.py."""

from __future__ import annotations

import argparse

from .. import cli
from ..paths import FUSED_DIR
from ..server import settings

DESCRIPTION = "Step 8: serve the classifier over HTTP (FastAPI + uvicorn), with a web page."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    cli.add_model_args(p, FUSED_DIR)
    cli.add_threshold_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; default 8000)")
    settings.add_arguments(p)
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log each request (default on)")
    return p


@cli.cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    from ..server.run import serve

    serve(args)
