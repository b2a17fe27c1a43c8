"""Step 8, the HTTP server, on a tiny random model: endpoints, limits and errors, the API key,
micro-batching, disconnects, the not-ready state, hostile clients (idle or slow connections,
costly requests, other sites' pages) and the command line. The server runs in-process on a free
loopback port (uvicorn in a thread); the client is the standard library's."""

import argparse
import contextlib
import http.client
import json
import logging
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from conftest import ROOT, run_script
from smslora import scoring
from smslora.artifacts import read_jsonl
from smslora.errors import UserError
from smslora.model import load_model
from smslora.paths import STRESS_SUITE
from smslora.server import settings as server_settings
from smslora.server.app import create_app
from smslora.server.connections import AcceptErrors
from smslora.server.info import model_info
from smslora.server.run import BackgroundServer, exposure_warning
from smslora.server.settings import Settings
from smslora.task import DEFAULT_THRESHOLD
from smslora.threshold import read_threshold

METRICS = {"messages": 1031, "accuracy": 0.98, "f1": 0.95, "roc_auc": 0.997}


def request(url, method="GET", path="/", body=None, headers=None, timeout=30):
    """(status, parsed JSON or text, headers) for one request on a fresh connection."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers={**hdrs, **(headers or {})})
        r = conn.getresponse()
        raw = r.read()
        ctype = r.getheader("content-type", "")
        data = json.loads(raw) if "json" in ctype else raw.decode("utf-8", "replace")
        return r.status, data, dict(r.getheaders())
    finally:
        conn.close()


def classify(url, messages, **kw):
    return request(url, "POST", "/v1/classify", {"messages": messages}, **kw)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def fused(tmp_path_factory, tiny_model):
    """A copy of the tiny model as a fused folder is: with its own test figures."""
    d = tmp_path_factory.mktemp("models") / "fused"
    shutil.copytree(tiny_model, d)
    (d / "metrics.json").write_text(json.dumps({"on": "test.jsonl", "test": METRICS}))
    return d


def make_app(loaded, folder, **settings):
    model, tokenizer = loaded
    threshold = read_threshold(folder)
    info = model_info(folder, None, threshold)
    return create_app(model, tokenizer, threshold, info, Settings(**settings))


@pytest.fixture(scope="module")
def server(loaded, fused):
    with BackgroundServer(make_app(loaded, fused, max_wait_ms=50)) as srv:
        yield srv


def stats(url, **kw):
    status, data, _ = request(url, path="/v1/stats", **kw)
    assert status == 200, data
    return data


def direct(loaded, messages):
    return [float(x) for x in scoring.p_spam(*loaded, messages)]


# ---------------------------------------------------------------------------------------------
# Endpoints.


def absolute_paths(value) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in absolute_paths(v)]
    return [value] if isinstance(value, str) and value.startswith(("/", "~")) else []


def test_healthz_model_info_and_docs(server, fused):
    assert request(server.url, path="/healthz")[:2] == (200, {"status": "ok"})
    status, info, _ = request(server.url, path="/v1/model")
    assert status == 200
    assert info["model"] == "fused" and info["base_model"] == "fused"
    assert absolute_paths(info) == [] and str(fused.parent) not in json.dumps(info)
    assert info["threshold"] == DEFAULT_THRESHOLD and info["adapter_config"] is None
    assert info["test_metrics"]["f1"] == METRICS["f1"] and info["ready"] is True
    assert info["test_metrics"]["on"] == "test.jsonl"
    assert info["settings"]["max_wait_ms"] == 50 and info["settings"]["api_key_required"] is False
    status, page, _ = request(server.url, path="/docs")
    assert status == 200 and "swagger" in page.lower()
    status, schema, _ = request(server.url, path="/openapi.json")
    assert status == 200 and "/v1/classify" in schema["paths"]
    status, body, _ = request(server.url, path="/no/such/thing")
    assert status == 404 and set(body) == {"error"}


def test_model_info_of_adapters_and_fused_folders(tmp_path, tiny_model):
    ad = tmp_path / "adapters"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({
        "model": "/srv/models/base", "data": str(tmp_path / "data"), "lora_parameters": {
            "rank": 8}}))
    (ad / "threshold.json").write_text(json.dumps({"threshold": 0.7}))
    info = model_info(tiny_model, ad, read_threshold(ad))
    assert info["threshold"] == 0.7 and info["adapter_config"]["lora_parameters"]["rank"] == 8
    assert info["adapter_path"] == "adapters" and info["fused"] is False
    assert info["model"] == tiny_model.name and info["test_metrics"] is None
    fused = model_info(ad, None, 0.7)  # the fused layout
    assert fused["fused"] is True and fused["base_model"] == "base"
    assert fused["adapter_config"]["data"] == "data" and absolute_paths(fused) == []
    assert fused["test_metrics"] is None  # none stored with it: none shown


def test_model_info_shows_the_served_folder_s_own_metrics(tmp_path, fused):
    """The figures of the folder served, never another model's (the base model has none)."""
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "eval_retrained.json").write_text(json.dumps({"test": METRICS}))
    base = tmp_path / "base"
    shutil.copytree(fused, base)
    (base / "metrics.json").unlink()
    assert model_info(base, None, 0.5)["test_metrics"] is None
    assert model_info(fused, None, 0.5)["test_metrics"]["accuracy"] == METRICS["accuracy"]
    ad = tmp_path / "adapters"  # adapters served on the base: the adapter folder's figures
    ad.mkdir()
    (ad / "metrics.json").write_text(json.dumps({"test": {**METRICS, "accuracy": 0.5}}))
    assert model_info(base, ad, 0.5)["test_metrics"]["accuracy"] == 0.5
    for bad in ("[1, 2]", "{not json", json.dumps({"test": 3})):
        (ad / "metrics.json").write_text(bad)
        assert model_info(base, ad, 0.5)["test_metrics"] is None
    (ad / "metrics.json").unlink()
    os.mkfifo(ad / "metrics.json")  # never waited for
    assert model_info(base, ad, 0.5)["test_metrics"] is None


def test_classify_gives_each_message_its_own_result_in_order(server, loaded):
    messages = ["WINNER!! Claim your free prize now, call 09061701461",
                "Ok lar, I'll be there by 6 😂",
                "ctrl\x00chars\x07 and \u200b zero width \ttab\nnewline",
                "Ok lar, I'll be there by 6 😂"]
    status, body, _ = classify(server.url, messages)
    assert status == 200, body
    assert body["model"] and body["threshold"] == DEFAULT_THRESHOLD
    want = direct(loaded, messages)
    assert len(body["results"]) == len(messages)
    for r, p in zip(body["results"], want):
        assert r["p_spam"] == pytest.approx(p, abs=1e-4)
        assert r["label"] == ("spam" if r["p_spam"] > body["threshold"] else "ham")
    assert body["results"][1] == body["results"][3]


def test_page_examples_and_static_files(server):
    status, page, headers = request(server.url, path="/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert 'id="message"' in page and 'id="classify"' in page and "__CONFIG__" not in page
    status, body, _ = request(server.url, path="/v1/examples")
    suite = [r for r in read_jsonl(STRESS_SUITE) if r["category"] == "final-boss"]
    assert status == 200 and len(body["examples"]) == len(suite) == 5
    assert [e["text"] for e in body["examples"]] == [r["text"] for r in suite]
    for e in body["examples"]:  # embedded in the page (JSON-escaped)
        assert json.dumps(e["text"], ensure_ascii=False).replace("<", "\\u003c") in page
    assert request(server.url, path="/static/app.js")[0] == 200
    assert request(server.url, path="/static/style.css")[0] == 200


# ---------------------------------------------------------------------------------------------
# Limits and errors: always a 4xx with {"error": "..."}, never a 500, and the server goes on.

BAD = [
    ("malformed JSON", b'{"messages": ["unterminated', 400, "malformed JSON"),
    ("not JSON at all", b"hello", 400, "malformed JSON"),
    ("empty body", b"", 422, "JSON object"),
    ("JSON but not an object", b'["a", "b"]', 422, "JSON object"),
    ("missing field", {"message": ["hi"]}, 422, "messages: field required"),
    ("messages not a list", {"messages": "hi"}, 422, "messages: expected a list of strings"),
    ("a message not a string", {"messages": ["hi", 3]}, 422, "messages[1]"),
    ("null message", {"messages": [None]}, 422, "messages[0]"),
    ("empty list", {"messages": []}, 422, "messages is empty"),
    ("too many messages", {"messages": ["hi"] * 65}, 422, "65 messages, more than the limit of 64"),
    ("too long", {"messages": ["ok", "x" * 2001]}, 422, "messages[1] has 2001 characters"),
    ("blank", {"messages": ["fine", "  \n\t "]}, 422, "messages[1] is blank"),
    ("empty string", {"messages": [""]}, 422, "messages[0] is blank"),
    ("control characters only", {"messages": ["ok", "\x01\x02\u200b"]}, 422, "messages[1] is blank"),
    ("lone surrogate", b'{"messages": ["bad \\ud800 text"]}', 422, "not valid Unicode"),
]


@pytest.mark.parametrize("what,body,status,error", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_with_a_json_error(server, what, body, status, error):
    got, data, headers = request(server.url, "POST", "/v1/classify", body)
    assert got == status, data
    assert headers["content-type"] == "application/json" and set(data) == {"error"}
    assert error in data["error"], data["error"]


def test_limits_at_the_edge_are_accepted(server):
    status, body, _ = classify(server.url, ["y" * 2000] + ["hi"] * 63)
    assert status == 200 and len(body["results"]) == 64
    status, body, _ = classify(server.url, ["😂👍", "ﾃｽﾄ"])  # odd but real messages
    assert status == 200 and len(body["results"]) == 2


def test_oversize_body_by_content_length_and_by_bytes_read(server):
    u = urlsplit(server.url)
    # Declared too large: refused before the body is read (none is sent here).
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.putrequest("POST", "/v1/classify")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(256 * 1024 + 1))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "over the limit" in json.loads(r.read())["error"]
    conn.close()
    # No Content-Length (chunked): counted while read.
    big = json.dumps({"messages": ["z" * 1000] * 300}).encode()
    assert len(big) > 256 * 1024
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("POST", "/v1/classify", body=iter([big[i: i + 8192]
                                                    for i in range(0, len(big), 8192)]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and set(json.loads(r.read())) == {"error"}
    conn.close()
    assert classify(server.url, ["still fine?"])[0] == 200


def test_wrong_method_and_content_type(server):
    status, data, _ = request(server.url, path="/v1/classify")
    assert status == 405 and set(data) == {"error"}
    body = '{"messages": ["hi"]}'
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):  # curl -d without -H
        status, data, _ = request(server.url, "POST", "/v1/classify", body,
                                  headers={"Content-Type": ctype})
        assert status == 415 and "Content-Type: application/json" in data["error"], data
    for ctype in ("application/json; charset=utf-8", "application/vnd.api+json"):
        status, data, _ = request(server.url, "POST", "/v1/classify", body,
                                  headers={"Content-Type": ctype})
        assert status == 200, data
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)  # no Content-Type at all
    conn.request("POST", "/v1/classify", body=body)
    r = conn.getresponse()
    data = json.loads(r.read())
    assert r.status == 415 and "Content-Type: application/json" in data["error"], data
    assert "none was sent" in data["error"]
    conn.close()


# ---------------------------------------------------------------------------------------------
# The API key.


def test_api_key(loaded, tiny_model):
    key = "s3cret-key"
    with BackgroundServer(make_app(loaded, tiny_model, api_key=key)) as srv:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "nope"},
                        {"Authorization": key}):
            status, data, h = classify(srv.url, ["hi"], headers=headers)
            assert status == 401 and "API key" in data["error"] and h["www-authenticate"]
        assert request(srv.url, path="/v1/model")[0] == 401
        assert request(srv.url, path="/v1/stats")[0] == 401
        for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
            status, data, _ = classify(srv.url, ["hi"], headers=headers)
            assert status == 200 and len(data["results"]) == 1
        assert request(srv.url, path="/healthz")[:2] == (200, {"status": "ok"})
        status, page, _ = request(srv.url, path="/")
        assert status == 200 and '"api_key_required": true' in page
        assert request(srv.url, path="/static/app.js")[0] == 200
        status, schema, _ = request(srv.url, path="/openapi.json")
        assert status == 200 and "securitySchemes" in schema["components"]


def test_api_key_from_the_environment(monkeypatch):
    def parser():
        p = argparse.ArgumentParser()
        server_settings.add_arguments(p)
        return p

    monkeypatch.setenv("SMS_API_KEY", "from-env")
    assert parser().parse_args([]).api_key == "from-env"
    assert parser().parse_args(["--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("SMS_API_KEY")
    assert parser().parse_args([]).api_key is None


# ---------------------------------------------------------------------------------------------
# Micro-batching.


def test_concurrent_requests_share_a_batch(server, loaded):
    n = 16
    texts = [[f"message {i}.{j}: call 0800 {i * 7 + j} now" for j in range(1 + i % 3)]
             for i in range(n)]
    before = stats(server.url)
    u = urlsplit(server.url)
    conns = [http.client.HTTPConnection(u.hostname, u.port, timeout=30) for _ in range(n)]
    for c in conns:
        c.connect()
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        conns[i].request("POST", "/v1/classify", body=json.dumps({"messages": texts[i]}),
                         headers={"Content-Type": "application/json"})
        r = conns[i].getresponse()
        return r.status, json.loads(r.read())

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(one, range(n)))
    for c in conns:
        c.close()
    after = stats(server.url)
    batches = after["batches"] - before["batches"]
    assert after["messages"] - before["messages"] == sum(map(len, texts))
    assert after["requests"] - before["requests"] == n
    assert 1 <= batches < n and after["max_batch_seen"] > 1, after
    for msgs, (status, body) in zip(texts, answers):
        assert status == 200 and len(body["results"]) == len(msgs)
        want = direct(loaded, msgs)  # this request's own messages, in its order
        np.testing.assert_allclose([r["p_spam"] for r in body["results"]], want, atol=1e-4)


def test_max_batch_bounds_each_model_call(loaded, tiny_model):
    app = make_app(loaded, tiny_model, max_batch=4, max_messages=10, max_wait_ms=20)
    with BackgroundServer(app) as srv:
        msgs = [f"number {i} says hello" for i in range(10)]
        status, body, _ = classify(srv.url, msgs)
        assert status == 200
        np.testing.assert_allclose([r["p_spam"] for r in body["results"]], direct(loaded, msgs),
                                   atol=1e-4)
        s = stats(srv.url)
        assert s["max_batch_seen"] == 4 and s["messages"] == 10 and s["batches"] == 3
        assert app.state.scorer.stats.batch_sizes == {4: 2, 2: 1}


def test_busy_queue_answers_503(loaded, tiny_model):
    app = make_app(loaded, tiny_model, max_queue=3, max_messages=3)
    with BackgroundServer(app) as srv:
        app.state.scorer.queued = 2  # as if two messages were waiting
        status, data, h = classify(srv.url, ["a", "b"])
        assert status == 503 and "busy" in data["error"] and h["retry-after"] == "1"
        app.state.scorer.queued = 0
        assert classify(srv.url, ["a", "b"])[0] == 200


def test_client_disconnect_costs_nothing_and_breaks_nothing(loaded, tiny_model):
    app = make_app(loaded, tiny_model, max_wait_ms=400)
    with BackgroundServer(app) as srv:
        u = urlsplit(srv.url)
        body = json.dumps({"messages": ["gone before the answer"] * 5}).encode()
        for _ in range(3):
            s = socket.create_connection((u.hostname, u.port))
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json"
                      b"\r\nContent-Length: %d\r\n\r\n%s" % (u.netloc.encode(), len(body), body))
            time.sleep(0.05)
            s.close()
        time.sleep(0.8)  # past the batch window: the worker found nobody waiting
        st = stats(srv.url)
        assert st["messages"] == 0 and st["batches"] == 0, st
        status, data, _ = classify(srv.url, ["still here?", "yes"])
        assert status == 200 and len(data["results"]) == 2
        assert request(srv.url, path="/healthz")[0] == 200


def test_model_errors_do_not_kill_the_worker(loaded, tiny_model, monkeypatch):
    app = make_app(loaded, tiny_model, max_wait_ms=1)
    real = scoring.p_spam
    calls = []

    def flaky(model, tokenizer, messages, batch_size=32):
        calls.append(len(messages))
        if len(calls) == 1:
            raise RuntimeError("a batch-level failure")
        return real(model, tokenizer, messages, batch_size)

    with BackgroundServer(app) as srv:
        monkeypatch.setattr(scoring, "p_spam", flaky)
        status, body, _ = classify(srv.url, ["one", "two", "three"])
        assert status == 200 and len(body["results"]) == 3  # retried one by one
        assert calls == [3, 1, 1, 1]
        monkeypatch.setattr(scoring, "p_spam", lambda *a, **k: 1 / 0)
        status, body, _ = classify(srv.url, ["doomed"])
        assert status == 500 and set(body) == {"error"}
        monkeypatch.setattr(scoring, "p_spam", real)
        assert classify(srv.url, ["back to normal"])[0] == 200
        assert request(srv.url, path="/healthz")[0] == 200


# ---------------------------------------------------------------------------------------------
# Not ready until the model is loaded.


def test_not_ready_until_the_model_is_loaded(loaded, tiny_model):
    release = threading.Event()

    def loader():
        assert release.wait(20)
        return loaded

    app = create_app(None, None, 0.5, {"model": "tiny"}, Settings(), loader=loader)
    with BackgroundServer(app) as srv:
        assert request(srv.url, path="/healthz")[:2] == (503, {"status": "loading"})
        status, data, h = classify(srv.url, ["too early"])
        assert status == 503 and "loading" in data["error"] and h["retry-after"] == "1"
        assert classify(srv.url, [])[0] == 422  # bad input is still told first
        release.set()
        deadline = time.monotonic() + 20
        while request(srv.url, path="/healthz")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert classify(srv.url, ["now"])[0] == 200


def test_a_failed_load_is_reported(tmp_path):
    errors = []

    def loader():
        raise UserError("cannot load the model in /x: broken")

    app = create_app(None, None, 0.5, {"model": "x"}, Settings(), loader=loader,
                           on_load_error=errors.append)
    with BackgroundServer(app) as srv:
        deadline = time.monotonic() + 10
        while not errors:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        status, data, _ = request(srv.url, path="/healthz")
        assert status == 503 and data["status"] == "error" and "broken" in data["error"]
        status, data, _ = classify(srv.url, ["hi"])
        assert status == 503 and "broken" in data["error"]
    assert errors == ["cannot load the model in /x: broken"]


# ---------------------------------------------------------------------------------------------
# Hostile but cheap: idle or slow connections, costly requests, a stop in the middle of a batch.


def raw_connect(url) -> socket.socket:
    u = urlsplit(url)
    return socket.create_connection((u.hostname, u.port), timeout=10)


def closed_by_server(socks: list, timeout: float) -> set:
    """Those of socks the server has closed (end of file or reset) within timeout seconds."""
    closed, deadline = set(), time.monotonic() + timeout
    while len(closed) < len(socks) and time.monotonic() < deadline:
        ready, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.1)
        for s in ready:
            try:
                while s.recv(65536, socket.MSG_DONTWAIT):
                    pass
                closed.add(s)  # b"": end of file
            except BlockingIOError:
                pass
            except OSError:
                closed.add(s)
    return closed


def test_idle_and_slow_connections_are_closed(loaded, tiny_model):
    app = make_app(loaded, tiny_model, header_timeout=0.5, body_timeout=0.5, keep_alive=0.5)
    with BackgroundServer(app) as srv:
        host = urlsplit(srv.url).netloc.encode()
        idle = raw_connect(srv.url)  # connects, sends nothing
        headers = raw_connect(srv.url)  # never ends its headers
        headers.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: %s\r\n" % host)
        body = raw_connect(srv.url)  # never ends its body
        body.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 100\r\n\r\n{\"messages\"" % host)
        after = raw_connect(srv.url)  # one request, then nothing
        after.sendall(b"GET /healthz HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
        socks = [idle, headers, body, after]
        assert closed_by_server(socks, 10) == set(socks)
        trickle = raw_connect(srv.url)  # a header byte every 50 ms: the deadline still holds
        trickle.sendall(b"GET /healthz HTTP/1.1\r\nHost: %s\r\n" % host)
        for _ in range(200):
            if closed_by_server([trickle], 0.05):
                break
            with contextlib.suppress(OSError):
                trickle.sendall(b"X")
        assert closed_by_server([trickle], 0.05)
        for s in [*socks, trickle]:
            s.close()
        assert classify(srv.url, ["still serving"])[0] == 200


def test_connection_cap_closes_the_longest_idle(loaded, tiny_model):
    app = make_app(loaded, tiny_model, max_connections=8, header_timeout=600)
    with BackgroundServer(app) as srv:
        idle = [raw_connect(srv.url) for _ in range(30)]
        status, body, _ = classify(srv.url, ["room for one more?"])  # accepted after the 30
        assert status == 200 and len(body["results"]) == 1
        closed = closed_by_server(idle, 3)
        assert len(idle) - len(closed) <= 8 and idle[0] in closed and idle[-1] not in closed
        for s in idle:
            s.close()


def test_failed_accepts_are_one_line_a_minute(caplog):
    class Loop:
        def __init__(self):
            self.others = []

        def default_exception_handler(self, context):
            self.others.append(context)

    now = [0.0]
    handler, loop = AcceptErrors(interval=60, clock=lambda: now[0]), Loop()
    emfile = OSError(24, "Too many open files")
    with caplog.at_level(logging.INFO, logger="sms_serve"):
        for i in range(5000):  # asyncio reports each failed accept() like this
            now[0] = i * 0.01
            handler(loop, {"message": "socket.accept() out of system resource",
                           "exception": emfile})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "Too many open files (1 time)" in lines[0], lines
    assert all(r.exc_info is None for r in caplog.records)  # no traceback
    caplog.clear()
    now[0] = 61.0
    handler(loop, {"message": "socket.accept() out of system resource", "exception": emfile})
    assert [r.getMessage() for r in caplog.records] == [
        "cannot accept connections: Too many open files (5000 times in 61 s)"]
    handler(loop, {"message": "something else"})
    assert loop.others == [{"message": "something else"}]  # not ours: asyncio's own handling


def start_cli(model, *args, limits=None, log=None):
    """08_serve.py in a subprocess (with these open-file limits), once its model is loaded."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "08_serve.py"), "--model", str(model),
         "--port", "0", "--no-access-log", "--log-level", "warning", *map(str, args)],
        stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL, text=True, cwd=ROOT,
        env={**os.environ, "SMS_API_KEY": ""},
        preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limits)) if limits
        else None)
    line = proc.stdout.readline()
    assert "Serving" in line, line
    url = line.split(" on ")[1].split()[0]
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError):
            if request(url, path="/healthz", timeout=5)[0] == 200:
                return proc, url
        assert time.monotonic() < deadline and proc.poll() is None, "the model did not load"
        time.sleep(0.05)


def open_file_limits(pid: int) -> tuple[int, int]:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if x.startswith("Max open files"))
    return int(line.split()[3]), int(line.split()[4])


def stop(proc, sig=signal.SIGINT) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs Linux's /proc")
def test_idle_connections_cannot_exhaust_open_files(tiny_model, tmp_path):
    """2,100 connections that send nothing, against a server allowed 1,024 open files (a usual
    default): normal requests are still answered, the log stays short, the limit is kept."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2300:
        pytest.skip(f"this test needs 2,300 open files (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (2300 if hard == resource.RLIM_INFINITY
                                                else max(soft, min(hard, 4096)), hard))
    log = open(tmp_path / "server.log", "w")
    proc, url = start_cli(tiny_model, limits=(1024, 4096), log=log)
    idle = []
    try:
        assert open_file_limits(proc.pid) == (1024, 4096)  # not mlx-lm's (2048, 4096)
        u = urlsplit(url)
        for _ in range(2100):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((u.hostname, u.port))
            idle.append(s)
        time.sleep(1)
        status, body, _ = classify(url, ["are you still there?"], timeout=10)
        assert status == 200 and len(body["results"]) == 1
    finally:
        for s in idle:
            s.close()
        stop(proc)
        log.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    text = (tmp_path / "server.log").read_text()
    assert len(text) < 100_000 and "Traceback" not in text, text[:2000]


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs Linux's /proc")
def test_a_hard_open_file_limit_below_mlx_lm_s_is_kept(tiny_model):
    proc, url = start_cli(tiny_model, limits=(400, 1000))  # mlx-lm would ask for (2048, 4096)
    try:
        assert open_file_limits(proc.pid) == (400, 1000)
        assert classify(url, ["hello"])[0] == 200
    finally:
        assert stop(proc, signal.SIGTERM) == -signal.SIGTERM  # a service manager's stop


def long_messages(n: int, chars: int = 2000) -> list[str]:
    words = ["prize", "claim", "now", "call", "free", "0800", "mum", "tonight", "parcel", "£5"]
    return [" ".join(words[(i + j) % len(words)] + str(j) for j in range(chars))[:chars]
            for i in range(n)]


def test_requests_are_limited_in_tokens_not_just_messages(server):
    status, data, _ = classify(server.url, long_messages(64))  # 128 KB: within the body limit
    assert status == 422 and "prompt tokens, more than the limit of 8192" in data["error"]
    status, body, _ = classify(server.url, long_messages(2) + ["hi"] * 62)  # fits
    assert status == 200 and len(body["results"]) == 64


def test_the_queue_is_bounded_in_tokens(loaded, tiny_model, monkeypatch):
    """Few messages, many tokens: the queue is full by what it would cost the model."""
    app = make_app(loaded, tiny_model, max_request_tokens=1024, max_queue_tokens=3072)
    entered, release, real = threading.Event(), threading.Event(), scoring.p_spam

    def held(*args, **kw):
        entered.set()
        assert release.wait(30)
        return real(*args, **kw)

    monkeypatch.setattr(scoring, "p_spam", held)
    with BackgroundServer(app) as srv, ThreadPoolExecutor(4) as pool:
        try:
            first = pool.submit(classify, srv.url, ["holds the model"])
            assert entered.wait(20)
            costly = [pool.submit(classify, srv.url, long_messages(2)) for _ in range(3)]
            deadline = time.monotonic() + 20
            while stats(srv.url)["queued"] < 3 * 2:  # each message: about 510 tokens
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert stats(srv.url)["queued_tokens"] > 3 * 2 * 500
            status, data, h = classify(srv.url, long_messages(2), timeout=10)
            assert status == 503 and "tokens" in data["error"] and h["retry-after"] == "1"
        finally:
            release.set()
        assert first.result()[0] == 200 and [f.result()[0] for f in costly] == [200] * 3


def test_a_batch_stops_when_its_client_leaves(loaded, tiny_model, monkeypatch):
    app = make_app(loaded, tiny_model, score_batch=1, max_wait_ms=1)
    calls, real = [], scoring.p_spam

    def slow(model, tokenizer, messages, batch_size=32):
        calls.append(len(messages))
        time.sleep(0.1 * len(messages))
        return real(model, tokenizer, messages, batch_size)

    monkeypatch.setattr(scoring, "p_spam", slow)
    with BackgroundServer(app) as srv:
        u = urlsplit(srv.url)
        body = json.dumps({"messages": [f"message {i}" for i in range(20)]}).encode()
        s = raw_connect(srv.url)
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n%s" % (u.netloc.encode(), len(body), body))
        deadline = time.monotonic() + 20
        while not calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        s.close()  # gone after the first pass started
        while stats(srv.url)["batches"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        st = stats(srv.url)
        assert st["disconnects"] == 1 and st["messages"] < 20 and st["dropped_messages"] > 0, st
        assert sum(calls) == st["messages"]


def test_a_stop_in_the_middle_of_a_batch_is_prompt(loaded, tiny_model, monkeypatch):
    """What SIGTERM does (uvicorn sets should_exit): the waiting request gets 503, the batch
    stops after its current forward pass, and the server is gone within a few seconds."""
    app = make_app(loaded, tiny_model, score_batch=1, max_wait_ms=1)
    calls, real = [], scoring.p_spam

    def slow(model, tokenizer, messages, batch_size=32):
        calls.append(len(messages))
        time.sleep(0.2 * len(messages))  # 40 messages: 8 s in all
        return real(model, tokenizer, messages, batch_size)

    monkeypatch.setattr(scoring, "p_spam", slow)
    srv = BackgroundServer(app)
    with srv, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(classify, srv.url, [f"message {i}" for i in range(40)])
        deadline = time.monotonic() + 20
        while not calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        srv.server.should_exit = True
        srv.thread.join(timeout=5)
        assert not srv.thread.is_alive()
        status, data, _ = answer.result(timeout=5)
        assert status == 503 and "shutting down" in data["error"]
        assert sum(calls) < 40


# ---------------------------------------------------------------------------------------------
# Other sites' pages: Content-Type, Host, Origin; the page's security headers; the warning.


def test_a_page_of_another_site_cannot_use_the_server(server):
    u = urlsplit(server.url)
    body = json.dumps({"messages": ["sent by a page of another site"]})
    # fetch(url, {method: "POST", mode: "no-cors", body: new Blob([json])}): no preflight
    status, data, _ = request(server.url, "POST", "/v1/classify", body.encode(),
                              headers={"Content-Type": "", "Origin": "http://evil.example"})
    assert status == 403 and "--allow-origin" in data["error"]
    status, data, _ = request(server.url, "POST", "/v1/classify", body.encode(),
                              headers={"Content-Type": "text/plain", "Origin": "null"})
    assert status == 403
    # DNS rebinding: evil.example now resolves to this server; its page is "same-origin"
    for path in ("/v1/classify", "/v1/model", "/"):
        status, data, _ = request(server.url, "POST" if "classify" in path else "GET", path,
                                  body if "classify" in path else None,
                                  headers={"Host": f"evil.example:{u.port}",
                                           "Origin": f"http://evil.example:{u.port}"})
        assert status == 400 and "--allow-host" in data["error"], (path, data)
    # this server's own page, by address or as localhost
    for host in (u.netloc, f"localhost:{u.port}"):
        status, data, _ = request(server.url, "POST", "/v1/classify", body,
                                  headers={"Host": host, "Origin": f"http://{host}"})
        assert status == 200, data
    assert stats(server.url)["requests"] >= 2


def test_allowed_hosts_and_origins(loaded, tiny_model):
    app = make_app(loaded, tiny_model, allow_host=("sms.internal",),
                   allow_origin=("https://app.example",), api_key="k")
    with BackgroundServer(app) as srv:
        port = urlsplit(srv.url).port
        auth = {"Authorization": "Bearer k"}
        status, _, _ = request(srv.url, path="/healthz", headers={"Host": f"sms.internal:{port}"})
        assert status == 200
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type,authorization"}
        status, _, h = request(srv.url, "OPTIONS", "/v1/classify", headers=preflight)
        assert status == 200 and h["access-control-allow-origin"] == "https://app.example"
        status, data, h = classify(srv.url, ["hi"], headers={"Origin": "https://app.example",
                                                             **auth})
        assert status == 200 and h["access-control-allow-origin"] == "https://app.example"
        status, _, h = classify(srv.url, ["hi"], headers={"Origin": "https://other.example",
                                                          **auth})
        assert status == 403 and "access-control-allow-origin" not in h


def test_the_page_has_security_headers(server):
    status, _, h = request(server.url, path="/")
    csp = h["content-security-policy"]
    assert status == 200 and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"
    for path in ("/static/app.js", "/v1/model"):
        assert request(server.url, path=path)[2]["x-content-type-options"] == "nosniff"
    status, _, h = request(server.url, path="/docs")  # Swagger UI's inline script and CDN
    assert status == 200 and "content-security-policy" not in h


@pytest.mark.parametrize("host,key,warned", [
    ("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False),
    ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.20", None, True),
    ("0.0.0.0", "a-key", False)])
def test_a_warning_when_listening_beyond_loopback_without_a_key(host, key, warned):
    warning = exposure_warning(host, key)
    assert (warning is not None) == warned
    if warned:
        assert host in warning and "SMS_API_KEY" in warning


def test_a_refused_body_is_read_so_the_client_sees_the_answer(server):
    """urllib sends its whole body before it reads the answer: a 413 sent before the body was
    read (and the connection closed) meets a reset, seen as a broken pipe, not as the 413."""
    size, chunk = 300 * 1024, 16 * 1024

    def uploading():  # a client that uploads at its own pace
        for _ in range(size // chunk):
            time.sleep(0.01)
            yield b"x" * chunk

    for data in (uploading(), b"x" * size):
        req = urllib.request.Request(server.url + "/v1/classify", data=data, headers={
            "Content-Type": "application/json", "Content-Length": str(size)})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 413 and "over the limit" in json.loads(e.value.read())["error"]
    assert classify(server.url, ["still fine?"])[0] == 200


# ---------------------------------------------------------------------------------------------
# The command line.


@pytest.mark.parametrize("args,error", [
    (["--model", "/nonexistent/model"], "no model at /nonexistent/model"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--threshold", "2"], "--threshold must be a number from 0 to 1, not 2.0"),
    (["--max-queue-tokens", "100"], "--max-queue-tokens must be at least --max-request-tokens"),
    (["--header-timeout", "0"], "--header-timeout must be between 0.1 and 3600"),
    (["--allow-origin", "app.example.com"], "expected '*' or an origin like"),
])
def test_cli_errors_are_one_line(args, error, tiny_model):
    if "--model" not in args:
        args = ["--model", str(tiny_model), *args]
    r = run_script("08_serve.py", *args, "--port", "0")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert error in lines[0]


def test_cli_exits_when_the_model_cannot_be_loaded(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no weights: found only when loading
    r = run_script("08_serve.py", "--model", broken, "--port", "0", "--log-level", "critical")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "safetensors" in r.stderr


def test_cli_serves_until_interrupted(tiny_model, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "08_serve.py"), "--model", str(tiny_model),
         "--port", "0", "--no-access-log", "--log-level", "warning",
         "--threshold", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "SMS_API_KEY": ""})
    try:
        line = proc.stdout.readline()
        assert "Serving" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" on ")[1].split()[0]
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(url, path="/healthz", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        status, body, _ = classify(url, ["hello from the command line"])
        assert status == 200 and body["threshold"] == 0  # --threshold 0: everything is spam
        assert body["results"][0]["label"] == "spam" and body["results"][0]["p_spam"] > 0
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop, then the scripts' usual 130
        rc = proc.wait(timeout=20)
        err = proc.stderr.read()
        assert rc == 130 and err.strip().endswith("interrupted"), (rc, err)
        assert "warning" not in err  # loopback: no warning about an open server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_load_test_runs_on_the_tiny_model(tiny_model, data_dir, tmp_path):
    out = tmp_path / "load_test.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--model",
                        str(tiny_model), "--data", str(data_dir / "test.jsonl"), "--requests", "12",
                        "--concurrency", "3", "--time-limit", "60", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "errors: 0" in r.stdout and "ratio served/offline" in r.stdout
    report = json.loads(out.read_text())
    load = report["load"]
    assert load["errors"] == 0 and load["completed"] == 12 and load["server"]["requests"] == 12
    assert load["messages"] == load["server"]["messages"] == report["offline"]["messages"]
    assert load["latency_ms"]["p50"] <= load["latency_ms"]["p95"]
    assert report["offline"]["messages_per_s"] > 0 and report["ratio_served_to_offline"] > 0
