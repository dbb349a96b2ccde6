"""How the server holds up against two careless clients (issue 11), measured on a live server.

1. A 20 MB request body: how long until the server answers it, how long /health takes meanwhile, and how
   much the server's peak memory grows.
2. Five non-streaming clients that give up after one second: how long the next, normal request waits.

    python benchmarks/serve_limits.py                 # this checkout
    python benchmarks/serve_limits.py --src OTHER/src # another checkout's code, for a before/after

The server runs the untrained tiny model in its own process (so its memory is its own), on 127.0.0.1.
Prints a table and writes benchmarks/results/serve_limits[-LABEL].json.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import sys, uvicorn
from codetune.tiny import ensure_tiny_model
from codetune.serve import create_app, load_engine
engine = load_engine(ensure_tiny_model(), name="tiny", max_tokens_limit=1000)
uvicorn.run(create_app(engine), host="127.0.0.1", port=int(sys.argv[1]), log_level="error")
"""
PROMPT = [{"role": "user", "content": "Write a Python module with many small functions."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def big_body(port: int, size: int) -> dict:
    """Send a `size`-byte body by hand, stopping as soon as the server answers; the status and the time."""
    filler = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * size + b'"}]}'
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(filler)
    )
    t0 = time.perf_counter()
    sent, reply = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=600) as s:
        s.sendall(head)
        while sent < len(filler):
            readable, writable, _ = select.select([s], [s], [], 1.0)
            if readable:
                break
            if writable:
                try:
                    sent += s.send(filler[sent : sent + 65536])
                except (BrokenPipeError, ConnectionResetError):
                    break
        s.settimeout(600)
        try:
            while b"\r\n" not in reply:
                data = s.recv(65536)
                if not data:
                    break
                reply += data
        except (ConnectionResetError, TimeoutError):
            pass
    status = reply.split(b"\r\n", 1)[0].decode(errors="replace") or "(connection closed)"
    return {"status": status, "seconds": time.perf_counter() - t0, "body_bytes_sent": sent}


def health_while(port: int, busy: threading.Event) -> list[float]:
    latencies = []
    while busy.is_set():
        t0 = time.perf_counter()
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=600)
        except httpx.HTTPError:
            pass
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.2)
    return latencies


def abandoned_then_normal(port: int, n: int, max_tokens: int) -> dict:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"model": "tiny", "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}

    def leave():
        try:
            httpx.post(url, json=body, timeout=1.0)
        except httpx.TimeoutException:
            pass

    threads = [threading.Thread(target=leave) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t0 = time.perf_counter()
    res = httpx.post(url, json={**body, "max_tokens": 4}, timeout=900)
    return {"status": res.status_code, "next_request_seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the codetune source tree to serve")
    parser.add_argument("--label", default="", help="suffix of the JSON file (e.g. main)")
    parser.add_argument("--body-mb", type=float, default=20.0)
    parser.add_argument("--abandoned", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=400)
    args = parser.parse_args()

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(args.src.resolve()), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        peak_before = memory_kb(server.pid, "VmHWM")
        busy = threading.Event()
        busy.set()
        latencies: list[float] = []
        poller = threading.Thread(target=lambda: latencies.extend(health_while(port, busy)))
        poller.start()
        big = big_body(port, int(args.body_mb * 1024 * 1024))
        busy.clear()
        poller.join()
        big["health_max_seconds"] = max(latencies, default=0.0)
        big["peak_rss_growth_mb"] = (memory_kb(server.pid, "VmHWM") - peak_before) / 1024
        gone = abandoned_then_normal(port, args.abandoned, args.max_tokens)
    finally:
        server.terminate()
        server.wait(timeout=30)

    result = {"src": str(args.src), "body_mb": args.body_mb, "big_body": big, "abandoned": args.abandoned, **gone}
    print(f"{'measure':<48} value")
    print(f"{f'{args.body_mb:g} MB body: answer':<48} {big['status']} after {big['seconds']:.2f} s")
    print(f"{'  body bytes the client got to send':<48} {big['body_bytes_sent']:,}")
    print(f"{'  slowest /health meanwhile':<48} {big['health_max_seconds']:.2f} s")
    print(f"{'  server peak memory growth':<48} {big['peak_rss_growth_mb']:.0f} MB")
    print(f"{f'{args.abandoned} abandoned requests: next request waits':<48} {gone['next_request_seconds']:.2f} s")
    out = ROOT / "benchmarks" / "results" / f"serve_limits{'-' + args.label if args.label else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
