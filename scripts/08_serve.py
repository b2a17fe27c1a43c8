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

from smslora import cli
from smslora.commands.serve import main

if __name__ == "__main__":
    cli.run(main)
