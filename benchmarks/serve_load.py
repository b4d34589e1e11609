"""Load test of ``lhcnet serve`` on this computer: N concurrent clients x M requests, then it stops.

Starts ``lhcnet serve`` on a free port of 127.0.0.1 (or uses ``--url``, which must be a loopback
address), warms it up, then each client thread sends its requests one after the other (a
keep-alive connection, ``POST /v1/predict`` with the example photo). Prints the latency
percentiles, requests per second, the error count, and the server's resident memory (VmRSS)
before and after, with its peak (VmHWM), next to the load average (the machine may be shared).

    python benchmarks/serve_load.py [--clients 8] [--requests 50] [--photo FILE] [--url URL]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from lhcnet.cli.serve import is_loopback

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "astronaut.jpg"
BOUNDARY = "lhcnet-load-test"


def multipart(photo: Path) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{photo.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + photo.read_bytes() + \
        f"\r\n--{BOUNDARY}--\r\n".encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, from /proc (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def start_server(log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "lhcnet.cli", "serve", "--host", "127.0.0.1",
                                    "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        if process.poll() is not None:
            sys.exit(f"lhcnet serve exited with {process.returncode}: {log.read_text()}")
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/v1/health")
            return process, url
        except OSError:
            time.sleep(0.5)
    process.terminate()
    sys.exit("lhcnet serve did not answer within 120 s")


def client(url: str, body: bytes, count: int, latencies: list[float], errors: list[str]) -> None:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    for _ in range(count):
        start = time.perf_counter()
        try:
            connection.request("POST", "/v1/predict", body, headers)
            response = connection.getresponse()
            data = response.read()
            if response.status != 200 or not json.loads(data)[0]["faces"]:
                errors.append(f"HTTP {response.status}: {data[:200]!r}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            connection.close()
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        latencies.append(time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--photo", type=Path, default=PHOTO)
    parser.add_argument("--url", help="a running server on a loopback address (default: start one)")
    args = parser.parse_args()

    process = None
    if args.url:
        host = urllib.parse.urlsplit(args.url).hostname or ""
        if not is_loopback(host):
            sys.exit(f"--url must be on this computer (127.0.0.1, ::1 or localhost), got {host}")
        url = args.url.rstrip("/")
    else:
        log = Path(tempfile.mkdtemp(prefix="serve_load_")) / "serve.log"
        process, url = start_server(log)
    body = multipart(args.photo)
    try:
        warm_latencies: list[float] = []
        warm_errors: list[str] = []
        client(url, body, 3, warm_latencies, warm_errors)
        if warm_errors:
            sys.exit(f"warm-up failed: {warm_errors[0]}")
        before = memory_kb(process.pid) if process else {}
        latencies: list[float] = []
        errors: list[str] = []
        threads = [threading.Thread(target=client, args=(url, body, args.requests, latencies, errors))
                   for _ in range(args.clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        after = memory_kb(process.pid) if process else {}
    finally:
        if process:
            process.terminate()
            process.wait(timeout=30)

    load = os.getloadavg()
    print(f"{args.clients} clients x {args.requests} requests, POST /v1/predict with {args.photo.name} "
          f"({len(body) / 1e3:.0f} kB), {url}; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"requests: {len(latencies)} in {elapsed:.1f} s = {len(latencies) / elapsed:.1f} requests/s; "
          f"errors: {len(errors)}")
    ms = sorted(1000 * t for t in latencies)
    print(f"latency ms: p50 {percentile(ms, 50):.0f}, p95 {percentile(ms, 95):.0f}, max {ms[-1]:.0f} "
          f"(one request alone, warm: {1000 * min(warm_latencies):.0f})")
    if before:
        print(f"server memory: RSS {before['VmRSS'] / 1024:.0f} MiB before, {after['VmRSS'] / 1024:.0f} MiB "
              f"after (peak {after['VmHWM'] / 1024:.0f} MiB)")
    for error in errors[:5]:
        print("error:", error)


if __name__ == "__main__":
    main()
