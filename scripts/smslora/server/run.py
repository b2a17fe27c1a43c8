"""Running the app: a bound socket (port 0 picks a free one), uvicorn in this thread (the command
line) or in another (tests, the load test), with the connection limits of the app's settings."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import sys
import threading
import time

import uvicorn

from ..errors import UserError
from ..paths import FUSED_DIR
from ..threshold import threshold_for
from .app import create_app
from .connections import BACKLOG, AcceptErrors, connection_cap, guarded_protocol, \
    keep_open_file_limit
from .info import model_info
from .settings import Settings, from_args

MAX_HEADER_BYTES = 16 * 1024  # a request's line and headers together


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}")
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server listens beyond this machine with no key."""
    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback or api_key:
        return None
    return (f"listening on {host} with no API key: anyone who can reach this port can use the "
            "model; set SMS_API_KEY (or --api-key), or listen on 127.0.0.1")


class Server(uvicorn.Server):
    """uvicorn's server, with accept errors logged briefly; when a stop begins, requests waiting
    for the model are answered 503 at once (not after the batch in progress) and requests still
    sending their body are closed."""

    def __init__(self, config: uvicorn.Config, scorer=None):
        super().__init__(config)
        self.scorer = scorer

    async def serve(self, sockets=None):
        asyncio.get_running_loop().set_exception_handler(AcceptErrors())
        await super().serve(sockets)

    async def shutdown(self, sockets=None):
        if self.scorer is not None:
            self.scorer.refuse_waiting()
        for connection in list(self.server_state.connections):
            if getattr(connection, "phase", None) == "body":  # still sending: not worth waiting
                connection.close("the server is stopping")
        await super().shutdown(sockets)


def make_server(app, log_level: str = "warning", access_log: bool = False) -> Server:
    """uvicorn with the limits of the app's settings: open connections, read deadlines, header
    size, keep-alive and the time a stop waits for requests in progress."""
    s: Settings = app.state.settings
    cap = connection_cap(s.max_connections)
    config = uvicorn.Config(
        app, log_level=log_level, access_log=access_log, lifespan="on", backlog=BACKLOG,
        http=guarded_protocol(cap, s.header_timeout, s.body_timeout),
        limit_concurrency=cap + 1,  # requests on the connections allowed are never refused
        timeout_keep_alive=s.keep_alive, timeout_graceful_shutdown=s.shutdown_timeout,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    return Server(config, app.state.scorer)


class BackgroundServer:
    """uvicorn serving `app` in a thread, on a port of its own (tests, the load test):

        with BackgroundServer(app) as srv: ... srv.url ...
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = bind_socket(host, port)
        self.url = url_of(self.sock)
        self.server = make_server(app, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def check_folders(args) -> None:
    """Fail before listening; loading the model comes later."""
    if not (args.model / "config.json").is_file():
        step = "scripts/06_fuse.py" if args.model == FUSED_DIR else "the step that makes it"
        raise UserError(f"no model at {args.model} (config.json missing): run {step} first")
    if args.adapter_path is not None and not (args.adapter_path / "adapter_config.json").is_file():
        raise UserError(f"no adapters at {args.adapter_path}: run scripts/03_train.py first")


def serve(args) -> None:
    """The command line's server: check the options and folders, listen, then load the model on
    the model thread; until Ctrl-C or SIGTERM. A model that cannot be loaded is a UserError."""
    from ..model import load_model

    settings = from_args(args)
    if not (0 <= args.port <= 65535):
        raise UserError("--port must be between 0 and 65535")
    check_folders(args)
    threshold = threshold_for(args.threshold, args.model, args.adapter_path)
    info = model_info(args.model, args.adapter_path, threshold)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    keep_open_file_limit()

    sock = bind_socket(args.host, args.port)
    failed: list[str] = []
    server: Server | None = None

    def on_load_error(msg: str):
        failed.append(msg)
        if server is not None:
            server.should_exit = True

    app = create_app(None, None, threshold, info, settings,
                     loader=lambda: load_model(args.model, args.adapter_path,
                                               trust_remote_code=args.trust_remote_code),
                     on_load_error=on_load_error)
    server = make_server(app, args.log_level, args.access_log)
    url = url_of(sock)
    print(f"Serving {args.model}{' + ' + str(args.adapter_path) if args.adapter_path else ''} "
          f"(threshold {threshold:.3f}) on {url}  (page {url}/, docs {url}/docs"
          f"{', API key required' if settings.api_key else ''})", flush=True)
    warning = exposure_warning(sock.getsockname()[0], settings.api_key)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failed:
        raise UserError(failed[0])
