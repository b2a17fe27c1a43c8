#!/usr/bin/env python
"""Step 8: serve the classifier over HTTP (FastAPI + uvicorn), with a web page.

POST /v1/classify {"messages": ["...", ...]} answers a verdict (spam/ham) and P(spam) for each
message, in order. Requests that arrive within --max-wait-ms of each other are scored together in
one forward pass (micro-batching, at most --max-batch messages). GET / is a page to try it,
GET /docs the OpenAPI docs, GET /healthz says whether the model is loaded, GET /v1/model what
is served (with the test figures stored in the served folder).

The options bound what one client can cost (connections, time to send a request, tokens);
requests from other sites' pages are refused. docs/serving.md has the rules.
"""

from __future__ import annotations

import argparse

from smslora import cli
from smslora.paths import FUSED_DIR
from smslora.server import settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    from smslora.server.run import serve

    serve(args)


if __name__ == "__main__":
    cli.run(main)
