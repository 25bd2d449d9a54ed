"""Throughput and latency of ``launch/serve.py`` under concurrent official ``openai`` clients.

Starts ``launch/serve.py --tiny_random`` from ``--repo`` (default: this checkout) on a free
loopback port, warms every batch bucket up with one burst at the highest concurrency, then for
each concurrency C runs C threads, each with its own ``openai.OpenAI`` client (default
retries), each sending ``--requests`` greedy chat completions of ``--max_tokens`` tokens.
Reports requests/s (completed requests / wall time), p50 / p99 latency of a completed request
(retries included) and the number of failed requests (after the client's retries).

    python benchmarks/serve_load.py                       # this checkout
    python benchmarks/serve_load.py --repo=/path/to/other/checkout --json=before.json
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import openai

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_level(base_url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    latencies, failures = [], []
    lock = threading.Lock()

    def client(i):
        c = openai.OpenAI(base_url=base_url, api_key="unused", timeout=600)
        for j in range(requests):
            t0 = time.perf_counter()
            try:
                c.chat.completions.create(
                    model="advgame",
                    max_tokens=max_tokens,
                    temperature=0,
                    messages=[{"role": "user", "content": f"request {i} {j}: list the steps"}],
                )
            except openai.OpenAIError as err:
                with lock:
                    failures.append(type(err).__name__)
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
        c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pick(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return {
        "concurrency": concurrency,
        "completed": len(lat),
        "failed": len(failures),
        "wall_s": wall,
        "rps": len(lat) / wall,
        "p50_s": statistics.median(lat) if lat else float("nan"),
        "p99_s": pick(0.99),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=HERE, help="checkout whose launch/serve.py is measured")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--max_tokens", type=int, default=16)
    ap.add_argument("--json", default="")
    ap.add_argument("server_args", nargs="*", help="extra serve.py flags (after --)")
    args = ap.parse_args()
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=args.repo)
    cmd = [
        sys.executable,
        os.path.join(args.repo, "launch", "serve.py"),
        "--tiny_random",
        f"--port={port}",
        *args.server_args,
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        probe = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=5)
        deadline = time.time() + 300
        while True:
            try:
                probe.models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(
                        f"server did not start: {proc.stderr.read()[-2000:]}"
                    ) from None
                time.sleep(0.5)
        levels = [int(c) for c in args.concurrency.split(",")]
        run_level(base_url, max(levels), 2, args.max_tokens)  # compile every batch bucket
        rows = [run_level(base_url, c, args.requests, args.max_tokens) for c in levels]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print("| clients | requests/s | p50 s | p99 s | failed |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['rps']:.2f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} "
            f"| {r['failed']} / {r['completed'] + r['failed']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cmd": cmd, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
