"""`lorakit serve --model smollm2`: throughput and time to first token, bare base vs 1 vs 2 adapters.

Why: the LLM demo ends by serving its adapters; this measures what serving them costs against
serving the bare SmolLM2-135M-Instruct, on real chat prompts (the json task's evaluation reviews,
127–168 prompt tokens each after the chat template).

One `lorakit serve` process (a subprocess, so the clients do not share its GIL) serves two adapters
of the LLM demo: ``json`` and ``condition``, `lorakit train` runs of a few steps on the demo's two
tasks (the speed of a forward does not depend on the adapters' values), or the first two folders
under ``--adapters DIR``. Per scenario, ``--requests`` chat completions are sent at once (one
client each, asyncio + httpx on loopback; ``stream: true``, ``max_tokens`` 32, temperature 0, the
same prompts in every scenario) naming

- ``base``: the bare base (the server's name for it) in every request,
- ``1 adapter``: the first adapter in every request,
- ``2 adapters``: request i names adapter i mod 2, so every batch mixes the two.

Scenarios run round-robin (``--rounds``, order rotating) after one warm-up round. Requests/s is
requests ÷ the wall time from the first send to the last answer; time to first token (TTFT) is
from a request's send to its first chunk carrying text. Ratios to the bare base are medians of
per-round ratios, so a load spike in one round hits every scenario of that round alike. Generated
tokens/s, tokens per answer and rows per forward (the server's /metrics) say whether the scenarios
decoded alike: an adapter whose answers stop early frees rows and flatters requests/s. The server
process's CPU time (user + system, /proc) per generated token leaves out the time it waited for a
core while other processes ran, so on a shared machine it is the steadier measure of the work.

    .venv/bin/python benchmarks/serve_smollm2.py [--adapters DIR] [--requests 16 --max-tokens 32 --rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import httpx
import torch

from lorakit.io.adapter_files import CONFIG_NAME, adapter_folder

REPO = Path(__file__).resolve().parents[1]
TASKS = ("json", "condition")


# -- adapters ---------------------------------------------------------------------------------
def train_adapters(root: Path, steps: int, threads: int) -> None:
    """`lorakit train --model smollm2 --task causal-lm --max-steps STEPS --batch-size 8` on each task of
    the LLM demo, into root/json and root/condition (evaluated on 8 examples, to keep it short)."""
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train

    data = root.parent / "data"
    subprocess.run([sys.executable, str(REPO / "examples" / "llm_demo" / "build_data.py"), "--out", str(data)],
                   check=True, capture_output=True)
    for task in TASKS:
        short_eval = data / f"{task}_eval8.jsonl"
        short_eval.write_text("".join((data / f"{task}_eval.jsonl").read_text().splitlines(True)[:8]))
        started = time.perf_counter()
        train(TrainConfig(model="smollm2", task="causal-lm", data=str(data / f"{task}_train.jsonl"),
                          eval_data=str(short_eval), out=str(root / task), max_steps=steps, batch_size=8,
                          threads=threads, quiet=True, general_samples=0, max_drop=0.5))
        print(f"- trained adapter {task!r}: {steps} steps ({time.perf_counter() - started:.0f} s)", flush=True)


def adapter_names(root: Path) -> list[str]:
    names = [p.name for p in sorted(root.iterdir()) if p.is_dir() and (adapter_folder(p) / CONFIG_NAME).is_file()]
    if len(names) < 2:
        sys.exit(f"--adapters {root}: needs two adapter folders (or `lorakit train` run folders) of smollm2; "
                 f"found {names}")
    return names[:2]


def prompts(count: int) -> list[str]:
    """The user turns of the json task's evaluation examples (the demo's data, built in a scratch folder)."""
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, str(REPO / "examples" / "llm_demo" / "build_data.py"), "--out", scratch],
                       check=True, capture_output=True)
        rows = [json.loads(line) for line in (Path(scratch) / "json_eval.jsonl").read_text().splitlines()]
    questions = [row["messages"][0]["content"] for row in rows]
    return [questions[i % len(questions)] for i in range(count)]


# -- server and clients -----------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def start_server(args: argparse.Namespace, root: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorakit", "serve", "--model", "smollm2", "--adapters", str(root),
               "--port", str(port), "--threads", str(args.threads), "--max-batch-size", str(args.max_batch_size),
               "--batch-window-ms", str(args.window_ms), "--log-level", "warning"]
    return c.launch_server(command, port, 180)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_request(http: httpx.AsyncClient, model: str, question: str, max_tokens: int
                      ) -> tuple[float, float, int]:
    """(seconds to the first chunk with text, seconds to the end, completion tokens) of one streamed chat."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"the server failed a request: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            choice = (chunk.get("choices") or [{}])[0]
            if first is None and (choice.get("delta", {}).get("content") or choice.get("finish_reason")):
                first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start, time.perf_counter() - start, tokens


async def scenario_load(url: str, names: list[str], questions: list[str], max_tokens: int
                        ) -> tuple[list[tuple[float, float, int]], float]:
    """Every request sent at once; their outcomes and the wall time until the last has finished."""
    limits = httpx.Limits(max_connections=2 * len(questions))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(http, names[i % len(names)], q, max_tokens)
                                         for i, q in enumerate(questions)))
        return list(results), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", help="folder holding two smollm2 adapter (or run) folders; default: train two")
    parser.add_argument("--train-steps", type=int, default=2, help="steps of each adapter trained when none given")
    parser.add_argument("--requests", type=int, default=16, help="concurrent chat requests per scenario and round")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the server (one: the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(max(args.threads, 1))
    print(c.header(f"lorakit serve --model smollm2: {args.requests} concurrent chat requests, max_tokens "
                   f"{args.max_tokens}, bare base vs 1 vs 2 adapters"))
    print(f"- server: --threads {args.threads} --max-batch-size {args.max_batch_size} --batch-window-ms "
          f"{args.window_ms}", flush=True)
    questions = prompts(args.requests)
    with tempfile.TemporaryDirectory() as scratch:
        if args.adapters:
            root = Path(args.adapters)
        else:
            root = Path(scratch) / "adapters"
            train_adapters(root, args.train_steps, args.threads)
        first, second = adapter_names(root)
        names = {"base": ["base"], "1 adapter": [first], "2 adapters": [first, second]}
        port = free_port()
        server = start_server(args, root, port)
        url = f"http://127.0.0.1:{port}"
        results = {k: {"ttft": [], "wall": [], "n": [], "tokens": [], "rows": [], "cpu": []} for k in names}
        try:
            for scenario in names:  # warm-up: one round of each, not counted
                asyncio.run(scenario_load(url, names[scenario], questions, args.max_tokens))
            for round_no in range(args.rounds):
                order = list(names)[round_no % len(names):] + list(names)[:round_no % len(names)]
                for scenario in order:
                    before = httpx.get(url + "/metrics", timeout=10).json()
                    cpu_before = cpu_seconds(server.pid)
                    outcomes, wall = asyncio.run(scenario_load(url, names[scenario], questions, args.max_tokens))
                    cpu = cpu_seconds(server.pid) - cpu_before
                    after = httpx.get(url + "/metrics", timeout=10).json()
                    forwards = after["forward_calls"] - before["forward_calls"]
                    entry = results[scenario]
                    entry["ttft"] += [t for t, _, _ in outcomes]
                    entry["tokens"].append(sum(n for _, _, n in outcomes))
                    entry["wall"].append(wall)
                    entry["cpu"].append(cpu)
                    entry["n"].append(len(outcomes))
                    entry["rows"].append((after["forward_rows"] - before["forward_rows"]) / max(forwards, 1))
                    print(f"  round {round_no + 1} {scenario}: {len(outcomes) / wall:.2f} requests/s, "
                          f"TTFT median {1000 * statistics.median(t for t, _, _ in outcomes):.0f} ms", flush=True)
        finally:
            server.terminate()
            server.wait(30)

    def per_round(key: str, scenario: str) -> float:
        """Median over rounds of the scenario's figure ÷ the bare base's in the same round."""
        return statistics.median(a / b for a, b in zip(results[scenario][key], results["base"][key], strict=True))

    rows = []
    for entry in results.values():
        entry["rps"] = [n / w for n, w in zip(entry["n"], entry["wall"], strict=True)]
        entry["tps"] = [t / w for t, w in zip(entry["tokens"], entry["wall"], strict=True)]
        entry["cpu_token"] = [cpu / t for cpu, t in zip(entry["cpu"], entry["tokens"], strict=True)]
        entry["ttft_round"] = [statistics.median(entry["ttft"][r * args.requests:(r + 1) * args.requests])
                               for r in range(args.rounds)]
    for scenario, entry in results.items():
        cpu_total, tokens_total = sum(entry["cpu"]), sum(entry["tokens"])
        rows.append([scenario, f"{sum(entry['n']) / sum(entry['wall']):.2f}", f"{per_round('rps', scenario):.3f}×",
                     f"{sum(entry['tokens']) / sum(entry['wall']):.1f}", f"{per_round('tps', scenario):.3f}×",
                     f"{1000 * statistics.median(entry['ttft']):.0f}", f"{1000 * percentile(entry['ttft'], 0.9):.0f}",
                     f"{per_round('ttft_round', scenario):.3f}×", f"{1000 * cpu_total / tokens_total:.0f}",
                     f"{per_round('cpu_token', scenario):.3f}×",
                     f"{sum(entry['tokens']) / sum(entry['n']):.1f}", f"{statistics.mean(entry['rows']):.1f}"])
    print()
    print(c.table(["served", "requests/s", "× base", "generated tokens/s", "× base", "TTFT p50 ms", "TTFT p90 ms",
                   "TTFT p50 × base", "server CPU ms per token", "× base", "tokens per answer", "rows per forward"],
                  rows))
    print("\n× base: the median over rounds of the scenario's figure ÷ the bare base's in the same round.")
    print(f"\n{args.rounds} rounds × {args.requests} requests per scenario (after a warm-up round); "
          f"load average at end: {c.loadavg()}")


if __name__ == "__main__":
    main()
