"""`lorakit serve` under load: throughput and latency with one adapter vs sixteen.

A random Llama (``random:llama``: hidden 256, 4 layers, 4 heads, intermediate 512, vocab 512,
byte tokenizer) gets 16 LoRA adapters (r=8 on q/k/v/o, random lora_B), saved under a temporary
adapter root. One ``lorakit serve`` process (a subprocess: the clients do not share its GIL)
serves them all; 32 concurrent clients (asyncio + httpx, loopback) each send ``--requests``
completions (``max_tokens`` 16, greedy, distinct prompts) naming

- ``base``: the bare base in every row (no adapter work at all),
- ``1 adapter``: every request the same adapter,
- ``16 adapters``: request i names adapter i mod 16, so every batch mixes many adapters.

Scenarios run round-robin (``--rounds``) after a warm-up; latency is per request (send to full
answer), throughput is requests / wall time of a scenario. The server's own counters give the
rows per forward its batcher achieved.

    .venv/bin/python benchmarks/serve_load.py [--clients 32 --requests 4 --max-tokens 16 --threads 1 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import httpx
import torch

import lorakit
from lorakit.train.models import load_model


def spec(args: argparse.Namespace) -> str:
    return (f"random:llama,hidden={args.hidden},layers={args.layers},heads={args.heads},kv_heads={args.heads},"
            f"intermediate={args.intermediate},vocab={args.vocab}")


def save_adapters(args: argparse.Namespace, root: Path) -> None:
    base = load_model(spec(args), "causal-lm", seed=args.seed).eval()
    adapted = lorakit.AdaptedModel(base)
    config = lorakit.AdapterConfig(r=args.rank, alpha=2.0 * args.rank, target_modules=("q_proj", "k_proj", "v_proj",
                                                                                         "o_proj"))
    for k in range(args.adapters):
        name = f"a{k:02d}"
        adapted.add_adapter(name, config, activate=False)
        g = torch.Generator().manual_seed(args.seed + 10 + k)
        with torch.no_grad():
            for module in adapted.adapter_modules(name).values():
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.02)
        lorakit.save_adapter(adapted, root / name, name=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, root: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorakit", "serve", "--model", spec(args), "--adapters", str(root),
               "--port", str(port), "--threads", str(args.threads), "--seed", str(args.seed),
               "--max-batch-size", str(args.max_batch_size), "--batch-window-ms", str(args.window_ms),
               "--log-level", "warning"]
    return c.launch_server(command, port, 120)


async def load(url: str, names: list[str], args: argparse.Namespace,
               round_no: int) -> tuple[list[tuple[float, int]], float]:
    """(latency, completion tokens) per request, and the wall time of the whole load."""

    async def client(cid: int, http: httpx.AsyncClient) -> list[tuple[float, int]]:
        latencies = []
        for r in range(args.requests):
            i = cid * args.requests + r
            prompt = f"request {round_no}-{i}: the quick brown fox jumps over the lazy dog"
            start = time.perf_counter()
            response = await http.post("/v1/completions", json={
                "model": names[i % len(names)], "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0})
            response.raise_for_status()
            latencies.append((time.perf_counter() - start, response.json()["usage"]["completion_tokens"]))
        return latencies

    limits = httpx.Limits(max_connections=args.clients * 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        groups = await asyncio.gather(*(client(i, http) for i in range(args.clients)))
        wall = time.perf_counter() - start
    return [t for g in groups for t in g], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client per scenario and round")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server process")
    args = parser.parse_args()
    torch.set_num_threads(max(args.threads, 1))
    print(c.header(f"lorakit serve: {args.clients} concurrent clients, max_tokens {args.max_tokens}, "
                   f"1 vs {args.adapters} adapters"))
    print(f"- model `{spec(args)}`, LoRA r={args.rank} on q/k/v/o; server: --threads {args.threads} "
          f"--max-batch-size {args.max_batch_size} --batch-window-ms {args.window_ms}")

    names = {"base": ["base"], "1 adapter": ["a00"], f"{args.adapters} adapters":
             [f"a{k:02d}" for k in range(args.adapters)]}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        save_adapters(args, root)
        port = free_port()
        server = start_server(args, root, port)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(load(url, names["1 adapter"], argparse.Namespace(**{**vars(args), "requests": 1}), -1))
            results: dict[str, dict[str, list[float]]] = {k: {"lat": [], "wall": [], "rows": [], "n": [],
                                                              "tokens": []} for k in names}
            for round_no in range(args.rounds):
                order = list(names)[round_no % len(names):] + list(names)[:round_no % len(names)]
                for scenario in order:
                    before = httpx.get(url + "/metrics", timeout=10).json()
                    latencies, wall = asyncio.run(load(url, names[scenario], args, round_no))
                    after = httpx.get(url + "/metrics", timeout=10).json()
                    forwards = after["forward_calls"] - before["forward_calls"]
                    rows = (after["forward_rows"] - before["forward_rows"]) / max(forwards, 1)
                    entry = results[scenario]
                    entry["lat"] += [t for t, _ in latencies]
                    entry["tokens"].append(sum(n for _, n in latencies))
                    entry["wall"].append(wall)
                    entry["n"].append(len(latencies))
                    entry["rows"].append(rows)
        finally:
            server.terminate()
            server.wait(30)

    rows = []
    for scenario, entry in results.items():
        lat = sorted(entry["lat"])
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        throughput = sum(entry["n"]) / sum(entry["wall"])
        tokens = sum(entry["tokens"]) / sum(entry["wall"])
        rows.append([scenario, f"{throughput:.1f}", f"{tokens:.0f}",
                     f"{statistics.median(lat) * 1000:.0f}", f"{p99 * 1000:.0f}",
                     f"{statistics.mean(entry['rows']):.1f}"])
    print()
    print(c.table(["served", "requests/s", "generated tokens/s", "p50 ms", "p99 ms", "rows per forward"], rows))
    print(f"\n{args.rounds} rounds × {args.clients} clients × {args.requests} requests per scenario; "
          f"load average at end: {c.loadavg()}")


if __name__ == "__main__":
    main()
