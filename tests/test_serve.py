"""Step 8, the HTTP server, on a tiny random model: endpoints, limits and errors, the API key,
micro-batching, disconnects, the not-ready state and the command line. The server runs in-process
on a free loopback port (uvicorn in a thread); the client is the standard library's."""

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
from smslora.server.info import model_info
from smslora.server.run import BackgroundServer
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
def reports(tmp_path_factory):
    d = tmp_path_factory.mktemp("reports")
    (d / "eval_retrained.json").write_text(json.dumps({"name": "retrained", "test": METRICS}))
    return d


def make_app(loaded, tiny_model, reports=None, **settings):
    model, tokenizer = loaded
    threshold = read_threshold(tiny_model)
    info = model_info(tiny_model, None, threshold, reports)
    return create_app(model, tokenizer, threshold, info, Settings(**settings))


@pytest.fixture(scope="module")
def server(loaded, tiny_model, reports):
    with BackgroundServer(make_app(loaded, tiny_model, reports, max_wait_ms=50)) as srv:
        yield srv


def stats(url, **kw):
    status, data, _ = request(url, path="/v1/stats", **kw)
    assert status == 200, data
    return data


def direct(loaded, messages):
    return [float(x) for x in scoring.p_spam(*loaded, messages)]


# ---------------------------------------------------------------------------------------------
# Endpoints.


def test_healthz_model_info_and_docs(server, tiny_model, reports):
    assert request(server.url, path="/healthz")[:2] == (200, {"status": "ok"})
    status, info, _ = request(server.url, path="/v1/model")
    assert status == 200
    assert info["model"] == str(tiny_model) and info["base_model"] == str(tiny_model)
    assert info["threshold"] == DEFAULT_THRESHOLD and info["adapter_config"] is None
    assert info["test_metrics"]["f1"] == METRICS["f1"] and info["ready"] is True
    assert info["settings"]["max_wait_ms"] == 50 and info["settings"]["api_key_required"] is False
    status, page, _ = request(server.url, path="/docs")
    assert status == 200 and "swagger" in page.lower()
    status, schema, _ = request(server.url, path="/openapi.json")
    assert status == 200 and "/v1/classify" in schema["paths"]
    status, body, _ = request(server.url, path="/no/such/thing")
    assert status == 404 and set(body) == {"error"}


def test_model_info_of_adapters_and_fused_folders(tmp_path, tiny_model, reports):
    ad = tmp_path / "adapters"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"model": "/base", "lora_parameters": {
        "rank": 8}}))
    (ad / "threshold.json").write_text(json.dumps({"threshold": 0.7}))
    info = model_info(tiny_model, ad, read_threshold(ad), reports)
    assert info["threshold"] == 0.7 and info["adapter_config"]["lora_parameters"]["rank"] == 8
    assert info["adapter_path"] == str(ad) and info["fused"] is False
    fused = model_info(ad, None, 0.7, tmp_path / "no-reports")  # the fused layout
    assert fused["fused"] is True and fused["base_model"] == "/base"
    assert fused["test_metrics"] is None


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
    assert r.status == 200 and len(json.loads(r.read())["results"]) == 1
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
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                      b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
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
# The command line.


@pytest.mark.parametrize("args,error", [
    (["--model", "/nonexistent/model"], "no model at /nonexistent/model"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--threshold", "2"], "--threshold must be a number from 0 to 1, not 2.0"),
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
         "--port", "0", "--reports", str(tmp_path), "--no-access-log", "--log-level", "warning",
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
