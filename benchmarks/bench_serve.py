"""Load test of the Serve app: concurrent HTTP clients in a second process, batched vs unbatched deployment.

The app (serve.app.build_app) serves an untrained tiny-preset causal model on 127.0.0.1 in a local
Ray (2 CPUs); for each max_batch_size (32 = batched, 1 = @serve.batch reduced to one request) a
client process runs `--clients` asyncio workers that POST /v1/generate back to back for
`--seconds` after a warm-up. Every request asks for the same prompt, max_new_bytes and sampling
settings (so the batcher may group them) with its own seed, and floors of 0 so each request is one
attempt of sampling and gating. Latency is client-side, per request.
Run from benchmarks/: python bench_serve.py [--out results/serve.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO: But soft, what light"


def request_body(seed: int, max_new_bytes: int) -> dict:
    return {"prompt": PROMPT, "max_new_bytes": max_new_bytes, "mode": "causal", "temperature": 0.8,
            "seed": seed, "c_floor": 0.0, "s_floor": 0.0, "max_retries": 0}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


async def load(url: str, clients: int, seconds: float, warmup_s: float, max_new_bytes: int) -> dict:
    """Run `clients` workers for warmup_s + seconds; returns the measurements of the last `seconds`."""
    import aiohttp  # a dependency of ray[serve]

    latencies_ms: list[float] = []
    queue_ms: list[float] = []
    generate_ms: list[float] = []
    errors: list[str] = []
    n_new_bits = 0
    start = time.perf_counter()
    measure_from, stop = start + warmup_s, start + warmup_s + seconds

    async def worker(index: int, session) -> None:
        nonlocal n_new_bits
        seed = index * 1_000_000
        while (sent := time.perf_counter()) < stop:
            seed += 1
            status, data, failure = 0, None, None
            try:
                async with session.post(f"{url}/v1/generate", json=request_body(seed, max_new_bytes)) as response:
                    status = response.status
                    data = await response.json(content_type=None)
            except Exception as exc:  # a refused connection or a timeout is an error of the run, not a crash
                failure = f"{type(exc).__name__}: {exc}"
            done = time.perf_counter()
            if sent < measure_from:
                continue
            if failure or status != 200:
                errors.append(failure or f"HTTP {status}: {json.dumps(data)[:200]}")
                continue
            latencies_ms.append((done - sent) * 1e3)
            queue_ms.append(data["timings"]["queue_ms"])
            generate_ms.append(data["timings"]["generate_ms"])
            n_new_bits += data["n_bits"]

    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(worker(i, session) for i in range(clients)))
    latencies_ms.sort()
    n = len(latencies_ms)
    return {"n_requests": n, "n_errors": len(errors), "errors_sample": errors[:5],
            "p50_ms": round(percentile(latencies_ms, 50), 1) if n else None,
            "p99_ms": round(percentile(latencies_ms, 99), 1) if n else None,
            "requests_per_s": round(n / seconds, 2), "new_bits_per_s": round(n_new_bits / seconds, 1),
            "mean_queue_ms": round(sum(queue_ms) / n, 1) if n else None,
            "mean_generate_ms": round(sum(generate_ms) / n, 1) if n else None}


def run_variant(url: str, args: argparse.Namespace) -> dict:
    """The client side, in a second process (the load generator must not share the server's interpreter)."""
    cmd = [sys.executable, __file__, "--client", url, "--clients", str(args.clients), "--seconds", str(args.seconds),
           "--warmup-s", str(args.warmup_s), "--max-new-bytes", str(args.max_new_bytes)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=args.seconds + args.warmup_s + 300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--max-new-bytes", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1],
                        help="max_batch_size of each deployment in turn (1: unbatched)")
    parser.add_argument("--batch-wait-s", type=float, default=0.05)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="the replica's CPUs (torch threads: floor of it)")
    parser.add_argument("--out", type=Path, default=Path("results/serve.jsonl"))
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)  # internal: run the load against URL
    args = parser.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(load(args.client, args.clients, args.seconds, args.warmup_s, args.max_new_bytes))))
        return
    serve_and_measure(args)


def serve_and_measure(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))  # Ray hands the driver's sys.path to the replicas: they import serve.app
    import ray
    import torch
    from common import emit
    from ray import serve

    from bitlm.checkpoint import save_pretrained
    from bitlm.config import ModelConfig
    from bitlm.model import BitTransformerLM
    from serve.app import build_app
    from serve.local import free_port, wait_for

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model_dir = save_pretrained(BitTransformerLM(ModelConfig.from_name("tiny")), Path(tmp) / "tiny")
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        results = {}
        try:
            for batch_size in args.batch_sizes:
                app_args = {"model": str(model_dir), "allowed_roots": [tmp], "audit_log": str(Path(tmp) / "audit.jsonl"),
                            "max_batch_size": batch_size, "batch_wait_timeout_s": args.batch_wait_s,
                            "num_cpus": args.num_cpus, "max_ongoing_requests": max(64, 2 * args.clients),
                            "max_new_bytes": max(512, args.max_new_bytes)}
                serve.run(build_app(app_args), name="bench", route_prefix="/", blocking=False)
                wait_for(f"{url}/healthz", 120)
                load_before = os.getloadavg()[0]
                measured = run_variant(url, args)
                # other work on the machine shows here: compare runs only at similar load
                measured["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                serve.delete("bench")
                results[batch_size] = measured
                emit({"bench": "serve", "variant": "unbatched" if batch_size == 1 else "batched",
                      "max_batch_size": batch_size, "batch_wait_timeout_s": args.batch_wait_s, "preset": "tiny",
                      "clients": args.clients, "seconds": args.seconds, "warmup_s": args.warmup_s,
                      "max_new_bytes": args.max_new_bytes, "prompt_bytes": len(PROMPT.encode()),
                      "replica_num_cpus": args.num_cpus, "floors": {"c": 0.0, "s": 0.0}, **measured}, args.out)
        finally:
            serve.shutdown()
            ray.shutdown()
    if 1 in results and len(results) > 1:
        batched = max((b for b in results if b != 1), key=lambda b: results[b]["requests_per_s"])
        ratio = results[batched]["requests_per_s"] / max(results[1]["requests_per_s"], 1e-9)
        print(f"throughput, max_batch_size={batched} over unbatched: {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    main()
