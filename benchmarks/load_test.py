#!/usr/bin/env python
"""A bounded load test of scripts/08_serve.py on loopback, beside offline batch scoring.

Starts the server (a subprocess, on a free 127.0.0.1 port), sends --requests requests of 1-16
messages drawn from the test split through --concurrency keep-alive clients, stops by itself at
--time-limit, and reports errors (must be 0), served messages/s, p50/p95 latency and the server's
batch counts. Then, in the same run, it scores the same messages offline (scoring.p_spam, batch
64) and gives the ratio served/offline. JSON goes to reports/load_test.json (or --out).

    python benchmarks/load_test.py                       # the fused model, 2,000 x 32 clients
    python benchmarks/load_test.py --model DIR --requests 100 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import _project  # noqa: F401  (scripts/ on sys.path)
from smslora import cli, fastblas  # light: mlx is imported after cli.run's set-up
from smslora.artifacts import atomic_write_json, read_jsonl
from smslora.errors import UserError
from smslora.paths import DATA_DIR, FUSED_DIR, REPORTS_DIR, ROOT

SERVE = ROOT / "scripts" / "08_serve.py"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def read_messages(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path} not found: run scripts/02_prepare_data.py first (or pass --data)")
    rows = read_jsonl(path)
    out = [r["message"] for r in rows if isinstance(r.get("message"), str) and r["message"].strip()]
    if not out:
        raise UserError(f"{path} has no 'message' fields")
    return out


def make_requests(messages: list[str], n: int, lo: int, hi: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [rng.sample(messages, min(rng.randint(lo, hi), len(messages))) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# The server, as a user starts it.


class Server:
    def __init__(self, args, deadline: float):
        cmd = [sys.executable, str(SERVE), "--model", str(args.model), "--port", "0",
               "--host", "127.0.0.1", "--no-access-log", "--log-level", "warning",
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--score-batch", str(args.score_batch),
               "--max-messages", str(max(args.max_messages, 1))]
        if args.adapter_path is not None:
            cmd += ["--adapter-path", str(args.adapter_path)]
        if args.trust_remote_code:
            cmd += ["--trust-remote-code"]
        env = {**os.environ, "SMS_API_KEY": ""}
        self.log = tempfile.TemporaryFile("w+")  # its stderr, shown if it fails
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=ROOT, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout] + [lines.put("")],
                         daemon=True).start()
        self.url = None
        while self.url is None:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.stop()
                raise UserError(f"the server did not start in time{self.tail()}")
            if not line:
                self.stop()
                raise UserError(f"the server exited ({self.proc.poll()}) before listening"
                                f"{self.tail()}")
            if line.startswith("Serving") and " on http://" in line:
                self.url = line.split(" on ", 1)[1].split()[0]
        while True:  # the model loads after the server listens
            if self.get("/healthz", ok_only=False)[0] == 200:
                break
            if self.proc.poll() is not None:
                raise UserError(f"the server exited ({self.proc.returncode}) while loading"
                                f"{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"the model did not load in time{self.tail()}")
            time.sleep(0.1)
        host, port = self.url.split("//", 1)[1].rsplit(":", 1)
        self.host, self.port = host, int(port)

    def get(self, path: str, ok_only: bool = True):
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            if ok_only:
                raise
            return e.code, None
        except OSError:
            if ok_only:
                raise
            return 0, None

    def tail(self) -> str:
        self.log.seek(0)
        lines = [x for x in self.log.read().splitlines() if x.strip()]
        return (": " + " | ".join(lines[-3:])) if lines else ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Clients: asyncio keep-alive HTTP/1.1 connections, standard library only.


async def read_response(reader) -> tuple[int, bytes, bool]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed by the server")
    status = int(status_line.split()[1])
    length, close = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.lower() == "close":
            close = True
    return status, await reader.readexactly(length), close


async def run_clients(host: str, port: int, jobs: list[list[str]], concurrency: int,
                      deadline: float, request_timeout: float) -> list[dict]:
    bodies = [json.dumps({"messages": m}).encode() for m in jobs]
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n").encode()
    next_job = iter(range(len(jobs)))
    records: list[dict] = []

    async def client():
        reader = writer = None
        while time.monotonic() < deadline:
            i = next(next_job, None)
            if i is None:
                break
            t0 = time.perf_counter()
            rec = {"i": i, "messages": len(jobs[i]), "ok": False}
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                writer.write(head % len(bodies[i]) + bodies[i])
                await writer.drain()
                status, payload, close = await asyncio.wait_for(
                    read_response(reader), max(min(request_timeout, deadline - time.monotonic()),
                                               0.01))
                rec["status"] = status
                if status == 200:
                    n = len(json.loads(payload)["results"])
                    rec["ok"] = n == len(jobs[i])
                    if not rec["ok"]:
                        rec["error"] = f"{n} results for {len(jobs[i])} messages"
                else:
                    rec["error"] = payload[:200].decode("utf-8", "replace")
                if close:
                    writer.close()
                    writer = None
            except Exception as e:  # noqa: BLE001  (every failure is counted, none stops the run)
                rec["error"] = f"{type(e).__name__}: {e}"[:200]
                if writer is not None:
                    writer.close()
                writer = None
            rec["t0"], rec["t1"] = t0, time.perf_counter()
            records.append(rec)
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records


# ---------------------------------------------------------------------------------------------


def offline_throughput(model, adapter_path, messages: list[str], batch: int, deadline: float,
                       trust_remote_code: bool = False):
    """scoring.p_spam over the same messages at batch `batch`, as 07_chat.py scores a file."""
    from smslora.model import load_model
    from smslora.scoring import p_spam

    loaded = load_model(model, adapter_path, trust_remote_code=trust_remote_code)
    p_spam(*loaded, messages[:batch], batch_size=batch)  # warm-up, untimed
    done, started, chunk = 0, time.perf_counter(), batch * 16
    for start in range(0, len(messages), chunk):
        p_spam(*loaded, messages[start: start + chunk], batch_size=batch)
        done = min(start + chunk, len(messages))
        if time.monotonic() > deadline:
            break
    seconds = time.perf_counter() - started
    return {"messages": done, "of": len(messages), "batch_size": batch,
            "seconds": round(seconds, 3), "messages_per_s": round(done / seconds, 2)}


@cli.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_model_args(p, FUSED_DIR)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--min-messages", type=int, default=1)
    p.add_argument("--max-messages", type=int, default=16)
    p.add_argument("--data", type=Path, default=DATA_DIR / "test.jsonl",
                   help="messages to send (the 'message' field; default data/test.jsonl)")
    p.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's --max-wait-ms")
    p.add_argument("--score-batch", type=int, default=16, help="the server's --score-batch")
    p.add_argument("--offline-batch", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=600.0,
                   help="seconds for the load phase, and again for the offline phase (600)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "load_test.json")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        raise UserError("--requests and --concurrency must be at least 1")
    if not 1 <= args.min_messages <= args.max_messages:
        raise UserError("need 1 <= --min-messages <= --max-messages")
    if not (args.model / "config.json").is_file():
        raise UserError(f"no model at {args.model}: run scripts/06_fuse.py first (or --model)")
    messages = read_messages(args.data)
    jobs = make_requests(messages, args.requests, args.min_messages, args.max_messages, args.seed)

    print(f"== serving {args.model} on loopback; {args.requests} requests, "
          f"{args.concurrency} clients, {args.min_messages}-{args.max_messages} messages each",
          flush=True)
    server = Server(args, time.monotonic() + args.startup_timeout)
    try:
        warm = make_requests(messages, args.concurrency, 1, args.max_messages, args.seed + 1)
        asyncio.run(run_clients(server.host, server.port, warm, args.concurrency,
                                time.monotonic() + 120, args.request_timeout))
        before = server.get("/v1/stats")[1]
        started = time.monotonic()
        records = asyncio.run(run_clients(server.host, server.port, jobs, args.concurrency,
                                          started + args.time_limit, args.request_timeout))
        after = server.get("/v1/stats")[1]
    finally:
        server.stop()

    ok = [r for r in records if r["ok"]]
    errors = [r for r in records if not r["ok"]]
    wall = (max(r["t1"] for r in records) - min(r["t0"] for r in records)) if records else 0.0
    served = sum(r["messages"] for r in ok)
    lat = [1000 * (r["t1"] - r["t0"]) for r in ok]
    d = {k: after[k] - before[k] for k in ("requests", "batches", "messages")}
    load = {
        "requests": args.requests, "sent": len(records), "completed": len(ok),
        "errors": len(errors), "hit_time_limit": len(records) < args.requests,
        "concurrency": args.concurrency, "messages": served, "seconds": round(wall, 3),
        "messages_per_s": round(served / wall, 2) if wall else 0.0,
        "requests_per_s": round(len(ok) / wall, 2) if wall else 0.0,
        "latency_ms": {"p50": round(percentile(lat, 0.5), 2),
                       "p95": round(percentile(lat, 0.95), 2),
                       "max": round(max(lat), 2) if lat else None},
        "server": {**d, "mean_batch": round(d["messages"] / d["batches"], 2) if d["batches"] else 0,
                   "max_batch_seen": after["max_batch_seen"],
                   "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                   "score_batch": args.score_batch},
        "error_samples": [r.get("error") for r in errors[:5]],
    }
    print(f"errors: {len(errors)}   completed {len(ok)}/{args.requests} requests "
          f"({served} messages) in {wall:.2f} s"
          + ("   ** stopped at the time limit **" if load["hit_time_limit"] else ""))
    print(f"served:  {load['messages_per_s']:.1f} messages/s, {load['requests_per_s']:.1f} "
          f"requests/s; latency p50 {load['latency_ms']['p50']:.1f} ms, "
          f"p95 {load['latency_ms']['p95']:.1f} ms; {d['batches']} model calls, "
          f"mean batch {load['server']['mean_batch']}")
    for e in load["error_samples"]:
        print(f"  error: {e}")

    sent_messages = [m for r in ok for m in jobs[r["i"]]] or [m for j in jobs for m in j]
    offline = offline_throughput(args.model, args.adapter_path, sent_messages, args.offline_batch,
                                 time.monotonic() + args.time_limit, args.trust_remote_code)
    ratio = load["messages_per_s"] / offline["messages_per_s"] if offline["messages_per_s"] else 0
    print(f"offline: {offline['messages_per_s']:.1f} messages/s (scoring.p_spam, batch "
          f"{args.offline_batch}, {offline['messages']} messages in {offline['seconds']:.2f} s)")
    print(f"ratio served/offline: {ratio:.3f}")

    import mlx.core as mx

    report = {"model": str(args.model),
              "adapter_path": None if args.adapter_path is None else str(args.adapter_path),
              "device": str(mx.default_device()), "machine": platform.machine(),
              "cpus": os.cpu_count(), "blas": fastblas.blas_in_use(),
              "data": str(args.data), "seed": args.seed, "load": load, "offline": offline,
              "ratio_served_to_offline": round(ratio, 4)}
    atomic_write_json(args.out, report)
    print(f"-> {args.out}")
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    cli.run(main)
